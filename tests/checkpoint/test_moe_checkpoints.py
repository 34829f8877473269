"""MoE checkpoints in every layout we read give the same parameters: HF per-expert tensors
(Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down_proj), transformers 5's packed
gate_up_proj/down_proj, and GGUF's ffn_*_exps. Both config.json spellings are read, and bad
checkpoints are errors that name the problem."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy

from jaxserve.checkpoint.convert import convert
from jaxserve.checkpoint.gguf import GGUFCheckpoint
from jaxserve.checkpoint.safetensors import SafetensorsCheckpoint, model_config_from_hf
from jaxserve.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "tiny_hf"
_EXPERT = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}


def read_hf(name: str) -> tuple[dict, dict]:
    weights = safetensors.numpy.load_file(FIXTURES / name / "model.safetensors")
    return weights, json.loads((FIXTURES / name / "config.json").read_text())


def write_hf(path: Path, weights: dict, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    safetensors.numpy.save_file(weights, path / "model.safetensors")
    return path


def stream(source) -> dict:
    """{(path, index): array} of everything a source yields; each exactly once."""
    out = {}
    for path, index, value in source.tensors():
        assert (path, index) not in out
        out[path, index] = value
    assert len(out) == source.num_tensors
    return out


def per_expert(items: dict, num_experts: int) -> dict:
    """Split whole-layer expert items into one item per expert, for comparing layouts."""
    out = {}
    for (path, index), value in items.items():
        if path.endswith(("gate_proj", "up_proj", "down_proj")) and "moe" in path \
                and not isinstance(index, tuple):
            assert value.shape[0] == num_experts
            out.update({(path, (index, e)): value[e] for e in range(num_experts)})
        else:
            out[path, index] = value
    return out


def packed(weights: dict, num_layers: int, num_experts: int) -> dict:
    """The per-expert Mixtral tensors packed the way transformers 5 holds them."""
    out = {k: v for k, v in weights.items() if ".experts." not in k}
    for i in range(num_layers):
        p = f"model.layers.{i}.block_sparse_moe."
        w = lambda n, e, p=p: weights[f"{p}experts.{e}.{n}.weight"]
        out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(p + "gate.weight")
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([w("w1", e), w("w3", e)]) for e in range(num_experts)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(
            [w("w2", e) for e in range(num_experts)])
    return out


def test_transformers5_packed_experts_equal_per_expert_tensors(tmp_path):
    weights, config = read_hf("mixtral")
    L, X = config["num_hidden_layers"], config["num_local_experts"]
    path = write_hf(tmp_path / "packed", packed(weights, L, X), config)
    want = stream(SafetensorsCheckpoint(FIXTURES / "mixtral"))
    got = per_expert(stream(SafetensorsCheckpoint(path)), X)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
    # and our layout is the HF one transposed: expert 3 of layer 1, gate rows
    w1 = weights["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    np.testing.assert_array_equal(want["layers/moe/gate_proj", (1, 3)], w1.T)


# ----- GGUF ---------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
               "block_sparse_moe.gate": "ffn_gate_inp"}


def write_gguf(path: Path, name: str) -> Path:
    """The fixture as llama.cpp's converter writes it: experts stacked per layer."""
    weights, c = read_hf(name)
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[name]
    X, heads, kv = c["num_local_experts"], c["num_attention_heads"], c["num_key_value_heads"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(X)
    w.add_expert_used_count(c["num_experts_per_tok"])
    if "moe_intermediate_size" in c:
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_weights_norm(c["norm_topk_prob"])
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
               "output.weight": weights["lm_head.weight"],
               "output_norm.weight": weights["model.norm.weight"]}
    for i in range(c["num_hidden_layers"]):
        experts = {}
        for key, value in weights.items():
            prefix = f"model.layers.{i}."
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):].removesuffix(".weight")
            if ".experts." in rest:
                e, proj = rest.split(".experts.")[1].split(".")
                experts.setdefault(_EXPERT[proj], {})[int(e)] = value
                continue
            if arch == "llama" and rest == "self_attn.q_proj":
                value = llama_cpp_permute(value, heads)
            elif arch == "llama" and rest == "self_attn.k_proj":
                value = llama_cpp_permute(value, kv)
            tensors[f"blk.{i}.{_GGUF_LAYER[rest]}.weight"] = value
        for kind, by_expert in experts.items():
            tensors[f"blk.{i}.ffn_{kind}_exps.weight"] = np.stack([by_expert[e]
                                                                   for e in range(X)])
    for tensor_name, value in tensors.items():
        w.add_tensor(tensor_name, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_gguf_expert_tensors_equal_the_safetensors_ones(tmp_path, name):
    hf = SafetensorsCheckpoint(FIXTURES / name)
    g = GGUFCheckpoint(write_gguf(tmp_path / f"{name}.gguf", name))
    same = lambda c: {**c.__dict__, "name": "", "rms_norm_eps": round(c.rms_norm_eps, 9)}
    assert same(g.config) == same(hf.config)  # GGUF stores the epsilon as float32
    want = per_expert(stream(hf), hf.config.num_experts)
    got = per_expert(stream(g), g.config.num_experts)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=0, err_msg=str(key))


def test_convert_writes_mixed_dense_and_moe_stacks(tmp_path):
    config = convert(FIXTURES / "qwen3_moe", tmp_path / "ck", progress=False, tokenizer=False)
    assert config.dense_layers == (2,) and config.moe_layers == (0, 1, 3)
    assert not config.norm_topk_prob and config.qk_norm


# ----- config.json spellings ----------------------------------------------------------

def test_both_config_spellings_read_the_same(tmp_path):
    _, new = read_hf("qwen3_moe")  # transformers 5: num_local_experts, rope_parameters
    old = {k: v for k, v in new.items() if k not in ("num_local_experts", "rope_parameters",
                                                     "dtype")}
    old |= {"num_experts": new["num_local_experts"], "torch_dtype": "float32",
            "rope_theta": new["rope_parameters"]["rope_theta"]}
    a = model_config_from_hf(new, Path("new/config.json"))
    b = model_config_from_hf(old, Path("old/config.json"))
    assert a == b and a.num_experts == 8


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_stated_dtype_decides_for_mixed_tensor_dtypes(tmp_path, key):
    weights, config = read_hf("qwen3")
    weights = {k: (v.astype(np.float16) if "norm" in k else v) for k, v in weights.items()}
    config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    path = write_hf(tmp_path / "m", weights, {**config, key: "bfloat16"})
    assert SafetensorsCheckpoint(path).default_dtype == "bfloat16"


# ----- bad checkpoints ----------------------------------------------------------------

def test_missing_expert_tensor_is_named(tmp_path):
    weights, config = read_hf("mixtral")
    del weights["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    path = write_hf(tmp_path / "m", weights, config)
    with pytest.raises(CheckpointError, match=r"layers/moe/up_proj\[layer 1, expert 5\]"):
        convert(path, tmp_path / "out", progress=False, tokenizer=False)
    assert not (tmp_path / "out").exists()


def test_expert_beyond_num_experts_is_an_error(tmp_path):
    weights, config = read_hf("mixtral")
    weights["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = \
        weights["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    path = write_hf(tmp_path / "m", weights, config)
    with pytest.raises(CheckpointError, match=r"experts\.8\.w1.*num_experts=8"):
        SafetensorsCheckpoint(path)


def test_top_k_larger_than_num_experts(tmp_path):
    weights, config = read_hf("mixtral")
    path = write_hf(tmp_path / "m", weights, {**config, "num_experts_per_tok": 9})
    with pytest.raises(CheckpointError,
                       match=r"num_experts_per_tok=9 must be between 1 and num_experts=8"):
        SafetensorsCheckpoint(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    shutil.copytree(FIXTURES / "mixtral", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({**config, "architectures": ["DeepseekV3ForCausalLM"]}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'DeepseekV3ForCausalLM'"
                       ".*MixtralForCausalLM.*Qwen3MoeForCausalLM"):
        SafetensorsCheckpoint(tmp_path / "m")


def test_old_per_expert_gguf_tensors_are_refused(tmp_path):
    path = tmp_path / "old.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.ffn_gate.0.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"ffn_gate\.0\.weight.*one tensor per expert"):
        GGUFCheckpoint(path)
