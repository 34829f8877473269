"""GGUF source: tiny GGUFs written with gguf.GGUFWriter the way llama.cpp's converter does."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from hf_weights import D, E, F, H, K, L, V, hf_weights, our_key, ours
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.checkpoint.convert import convert
from jaxserve.checkpoint.gguf import GGUFCheckpoint
from jaxserve.checkpoint.orbax_store import load
from jaxserve.errors import CheckpointError
from jaxserve.models.model_config import RopeScaling
from jaxserve.models.rope import inverse_frequencies
from sharding.mesh import MeshConfig, make_mesh

Q = gguf.GGMLQuantizationType

_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
               "model.norm.weight": "output_norm.weight"}
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.o_proj.weight": "attn_output.weight",
               **{f"self_attn.{p}_proj.{k}": f"attn_{p}.{k}"
                  for p in "qkv" for k in ("weight", "bias")},
               **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_GGUF_LAYER[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows of llama models (interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_gguf(path: Path, hf: dict, *, arch: str = "llama", qtype=lambda name: Q.F32,
               extra_tensors: dict | None = None, rope_freqs: np.ndarray | None = None) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny test model")
    w.add_block_count(L)
    w.add_context_length(2048)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(D)
    for name, value in hf.items():
        if arch == "llama" and ".q_proj." in name:
            value = llama_cpp_permute(value, H)
        elif arch == "llama" and ".k_proj." in name:
            value = llama_cpp_permute(value, K)
        _add(w, gguf_name(name), value, qtype(gguf_name(name)))
    if rope_freqs is not None:
        _add(w, "rope_freqs.weight", rope_freqs.astype(np.float32), Q.F32)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(writer: gguf.GGUFWriter, name: str, value: np.ndarray, qtype) -> None:
    if value.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, value.astype(np.float32))
    else:
        writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)


def streamed(source) -> dict:
    out = {}
    for path, layer, value in source.tensors():
        assert (path, layer) not in out
        assert value.dtype == np.float32
        out[path, layer] = value
    assert len(out) == source.num_tensors
    return out


def test_config_from_metadata(tmp_path):
    src = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", hf_weights()))
    c = src.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", V, E, F)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (L, H, K, D)
    assert (c.rope_theta, c.max_position_embeddings, c.rope_scaling) == (10000.0, 2048, None)
    assert c.rms_norm_eps == pytest.approx(1e-6)
    assert c.tie_word_embeddings and not c.attention_bias
    assert c.name == "tiny test model"
    assert src.default_dtype == "float32"


def test_f32_tensors_bit_exact_in_our_layout(tmp_path):
    hf = hf_weights()
    got = streamed(GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", hf)))
    assert set(got) == {our_key(n) for n in hf}
    for name in hf:
        np.testing.assert_array_equal(got[our_key(name)], ours(hf[name], name), err_msg=name)


def test_quantized_and_unpermuted(tmp_path):
    """Q8_0 for attention, Q4_0 for the MLP and embedding, F16 for o_proj.

    Quantization works on rows; the permutation moves whole rows; so dequantize(quantize(W))
    is exactly what must come back after the un-permute."""
    hf = hf_weights(seed=1)
    kinds = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.F16}
    qtype = lambda name: next((q for k, q in kinds.items() if f".{k}." in name), Q.Q4_0)
    got = streamed(GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", hf, qtype=qtype)))
    for name, w in hf.items():
        q = qtype(gguf_name(name))
        expected = w if w.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
        np.testing.assert_array_equal(got[our_key(name)], ours(expected, name), name)
        tolerance = {Q.Q8_0: 0.02, Q.F16: 2e-3, Q.Q4_0: 0.3}.get(q, 0) * np.abs(w).max()
        np.testing.assert_allclose(got[our_key(name)], ours(hf[name], name), atol=tolerance, rtol=0)


def test_untied_output(tmp_path):
    hf = hf_weights(untied=True)
    src = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", hf))
    assert not src.config.tie_word_embeddings
    lm_head = streamed(src)["lm_head", None]
    assert lm_head.shape == (E, V)
    np.testing.assert_array_equal(lm_head, hf["lm_head.weight"].T)


def test_qwen2_biases_and_no_permutation(tmp_path):
    hf = hf_weights(bias=True)
    src = GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", hf, arch="qwen2"))
    assert src.config.architecture == "qwen2" and src.config.attention_bias
    got = streamed(src)
    for name in hf:
        np.testing.assert_array_equal(got[our_key(name)], ours(hf[name], name), err_msg=name)
    assert got["layers/attn/q_proj/bias", 1].shape == (H, D)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", hf_weights(), arch="phi3")
    with pytest.raises(CheckpointError, match=r"phi\.gguf.*'phi3'"):
        GGUFCheckpoint(path)


def test_unsupported_tensor_type(tmp_path):
    bad = {"blk.0.attn_q_norm.weight": np.arange(E, dtype=np.int32)}
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), extra_tensors=bad)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_q_norm\.weight'.*I32"):
        GGUFCheckpoint(path)


def test_unknown_tensor_is_an_error(tmp_path):
    extra = {"blk.0.attn_q_norm.weight": np.ones(E, np.float32)}
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blk\.0\.attn_q_norm\.weight'"):
        GGUFCheckpoint(path)


def test_a_file_cut_anywhere_in_its_header_is_a_checkpoint_error(tmp_path):
    """Truncated downloads: the reader fails in many ways inside a cut header; each is a
    CheckpointError naming the file, never a traceback."""
    whole = write_gguf(tmp_path / "m.gguf", hf_weights()).read_bytes()
    cut = tmp_path / "cut.gguf"
    refused = 0
    for n in range(0, 4096, 13):
        cut.write_bytes(whole[:n])
        try:
            GGUFCheckpoint(cut)
        except CheckpointError as e:
            assert "cut.gguf" in str(e)
            refused += 1
    assert refused == len(range(0, 4096, 13))


def test_missing_file():
    with pytest.raises(CheckpointError, match="checkpoint not found: /nonexistent/x.gguf"):
        GGUFCheckpoint("/nonexistent/x.gguf")


@pytest.mark.parametrize("scaling", [
    RopeScaling(8.0, 1.0, 4.0, 8192),  # Llama 3.1's values; one frequency in the blend band
    RopeScaling(16.0, 2.0, 16.0, 16384),  # several in the band: recovered by the line fit
])
def test_llama3_rope_freqs_tensor(tmp_path, scaling):
    base = inverse_frequencies(D, 10000.0, None).astype(np.float64)
    scaled = inverse_frequencies(D, 10000.0, scaling).astype(np.float64)
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), rope_freqs=base / scaled)
    src = GGUFCheckpoint(path)
    got = src.config.rope_scaling
    assert got is not None and got.factor == pytest.approx(scaling.factor)
    np.testing.assert_allclose(inverse_frequencies(D, 10000.0, got), scaled, rtol=1e-5)
    assert ("rope_freqs", None) not in streamed(src)


def test_rope_freqs_not_llama3_is_an_error(tmp_path):
    divisors = np.linspace(1.0, 3.0, D // 2)[::-1].copy()  # decreasing: not Llama-3 shaped
    path = write_gguf(tmp_path / "m.gguf", hf_weights(), rope_freqs=divisors)
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        GGUFCheckpoint(path)


def test_convert_and_load_sharded(tmp_path):
    """End to end: quantized GGUF -> Orbax -> arrays sharded over pipeline x tensor."""
    hf = hf_weights(seed=2)
    path = write_gguf(tmp_path / "m.gguf", hf, qtype=lambda name: Q.Q8_0)
    expected = streamed(GGUFCheckpoint(path))
    config = convert(path, tmp_path / "ckpt", progress=False, tokenizer=False)
    mesh = make_mesh(MeshConfig(pipeline=2, tensor=2))
    loaded_config, params = load(tmp_path / "ckpt", mesh)
    assert loaded_config == config
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.dtype == np.float32 and q.shape == (L, E, H, D)
    assert q.sharding == NamedSharding(mesh, PartitionSpec("pipeline", None, "tensor", None))
    assert params["embedding"].sharding.spec == PartitionSpec("tensor", None)
    for (p, layer), value in expected.items():
        node = params
        for key in p.split("/"):
            node = node[key]
        got = np.asarray(jax.device_get(node))
        np.testing.assert_array_equal(got if layer is None else got[layer], value, err_msg=p)


def test_demo_gguf(tmp_path, demo_gguf):
    config = convert(demo_gguf, tmp_path / "ckpt", progress=False)
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.tie_word_embeddings, config.rope_theta) == (
        49152, True, 100000.0)
    assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
