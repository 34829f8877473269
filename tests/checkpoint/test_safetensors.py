"""HF safetensors source: tiny model directories written with the safetensors library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy
import tokenizers
from hf_weights import E, F, H, K, L, V, hf_weights, our_key, ours

from jaxserve.checkpoint.convert import convert, open_source
from jaxserve.checkpoint.orbax_store import load
from jaxserve.checkpoint.safetensors import SafetensorsCheckpoint
from jaxserve.errors import CheckpointError
from jaxserve.models.model_config import RopeScaling
from sharding.mesh import MeshConfig, make_mesh


def hf_config(arch: str = "LlamaForCausalLM", **overrides) -> dict:
    return {"architectures": [arch], "vocab_size": V, "hidden_size": E, "intermediate_size": F,
            "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": K,
            "rope_theta": 50000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024,
            "tie_word_embeddings": True, "torch_dtype": "float32", **overrides}


def write_hf(path: Path, weights: dict, config: dict, *, shards: int = 1,
             bf16: bool = False) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(weights)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards]
             for i in range(shards)} if shards > 1 else {"model.safetensors": names}
    for file, part in files.items():
        if bf16:
            safetensors.flax.save_file({n: jnp.asarray(weights[n], jnp.bfloat16) for n in part},
                                       path / file)
        else:
            safetensors.numpy.save_file({n: weights[n] for n in part}, path / file)
    if shards > 1:
        weight_map = {n: file for file, part in files.items() for n in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def streamed(source) -> dict:
    out = {}
    for path, layer, value in source.tensors():
        assert (path, layer) not in out
        out[path, layer] = np.asarray(value)
    assert len(out) == source.num_tensors
    return out


def assert_all_equal(got: dict, weights: dict, d: int = E // H) -> None:
    assert set(got) == {our_key(n) for n in weights}
    for name, w in weights.items():
        np.testing.assert_array_equal(got[our_key(name)], ours(w, name, d), err_msg=name)


def test_llama_f32_tied(tmp_path):
    weights = hf_weights()
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, hf_config()))
    c = src.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", V, E, F)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (L, H, K, E // H)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (50000.0, 1e-5, 1024)
    assert c.tie_word_embeddings and not c.attention_bias and c.rope_scaling is None
    assert src.default_dtype == "float32"
    got = streamed(src)
    assert all(v.dtype == np.float32 for v in got.values())
    assert_all_equal(got, weights)


def test_bf16_tensors_read_exactly(tmp_path):
    weights = hf_weights(seed=1)
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, hf_config(), bf16=True))
    assert src.default_dtype == "bfloat16"
    got = streamed(src)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in got.values())
    assert_all_equal(got, {n: w.astype(ml_dtypes.bfloat16) for n, w in weights.items()})

    convert(tmp_path / "m", tmp_path / "ckpt", progress=False, tokenizer=False)
    _, params = load(tmp_path / "ckpt", make_mesh(MeshConfig()))
    down = params["layers"]["mlp"]["down_proj"]
    assert down.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(down[1]), weights["model.layers.1.mlp.down_proj.weight"].T.astype(
            ml_dtypes.bfloat16))


def test_sharded_with_index(tmp_path):
    weights = hf_weights(seed=2)
    path = write_hf(tmp_path / "m", weights, hf_config(), shards=3)
    assert len(list(path.glob("*.safetensors"))) == 3
    assert_all_equal(streamed(SafetensorsCheckpoint(path)), weights)

    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*missing"):
        SafetensorsCheckpoint(path)


def test_qwen2_biases(tmp_path):
    weights = hf_weights(seed=3, bias=True)
    config = hf_config("Qwen2ForCausalLM", tie_word_embeddings=False)
    weights["lm_head.weight"] = np.ones((V, E), np.float32)
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, config))
    assert src.config.architecture == "qwen2" and src.config.attention_bias
    got = streamed(src)
    assert_all_equal(got, weights)
    assert got["layers/attn/k_proj/bias", 0].shape == (K, E // H)


def test_mistral_untied_sliding_window(tmp_path):
    weights = hf_weights(seed=4, untied=True)
    config = hf_config("MistralForCausalLM", tie_word_embeddings=False, sliding_window=512)
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, config))
    assert src.config.architecture == "mistral" and not src.config.tie_word_embeddings
    assert src.config.max_position_embeddings == 512  # no sliding window here: stay inside it
    got = streamed(src)
    assert got["lm_head", None].shape == (E, V)
    assert_all_equal(got, weights)


def test_a_context_past_the_sliding_window_is_refused(tmp_path):
    """The window caps the model's context: a longer cache.max_model_len would attend past
    it, where Mistral's own attention does not."""
    from jaxserve.config import Config
    from jaxserve.errors import ConfigError
    from jaxserve.loader import load_model

    config = hf_config("MistralForCausalLM", tie_word_embeddings=False, sliding_window=512)
    path = write_hf(tmp_path / "m", hf_weights(seed=4, untied=True), config)
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")).save(
        str(path / "tokenizer.json"))
    serve = Config().replace(
        model__name="m", model__dtype="float32", checkpoint__source=str(path),
        checkpoint__cache_dir=str(tmp_path / "cache"), cache__max_model_len=1024,
        cache__kv_cache_memory=float(1 << 20), runner__compilation_cache_dir=None)
    with pytest.raises(ConfigError, match="cache.max_model_len: 1024 is longer than the "
                                          "model's context of 512 positions"):
        load_model(serve, progress=False)
    loaded = load_model(serve.replace(cache__max_model_len=512), progress=False)
    assert loaded.model_config.max_position_embeddings == 512


def test_tied_checkpoint_with_redundant_lm_head(tmp_path):
    weights = hf_weights(seed=5, untied=True)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, hf_config()))
    got = streamed(src)
    assert ("lm_head", None) not in got
    assert len(got) == len(weights) - 2


def test_llama3_rope_scaling_and_head_dim(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    weights = hf_weights(seed=6, d=32)
    src = SafetensorsCheckpoint(
        write_hf(tmp_path / "m", weights, hf_config(head_dim=32, rope_scaling=rope)))
    assert src.config.head_dim == 32
    assert src.config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert_all_equal(streamed(src), weights, d=32)


def test_transformers_5_rope_parameters(tmp_path):
    config = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    del config["rope_theta"]
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", hf_weights(), config))
    assert src.config.rope_theta == 1e6 and src.config.rope_scaling is None


def test_unsupported_architecture(tmp_path):
    path = write_hf(tmp_path / "m", hf_weights(), hf_config("GPT2LMHeadModel"))
    with pytest.raises(CheckpointError, match=r"config\.json.*GPT2LMHeadModel"):
        open_source(path)


def test_unsupported_rope_type(tmp_path):
    config = hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="'yarn'"):
        SafetensorsCheckpoint(write_hf(tmp_path / "m", hf_weights(), config))


def test_missing_tensor_names_the_parameter(tmp_path):
    weights = hf_weights()
    del weights["model.layers.1.mlp.down_proj.weight"]
    path = write_hf(tmp_path / "m", weights, hf_config())
    with pytest.raises(CheckpointError, match=r"layers/mlp/down_proj\[layer 1\]"):
        convert(path, tmp_path / "ckpt", progress=False, tokenizer=False)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.tmp").exists()


def test_wrong_shape_names_the_tensor(tmp_path):
    weights = hf_weights()
    weights["model.layers.0.mlp.up_proj.weight"] = np.zeros((F, E + 1), np.float32)
    src = SafetensorsCheckpoint(write_hf(tmp_path / "m", weights, hf_config()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*65"):
        streamed(src)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        open_source(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected a .gguf file or a Hugging Face"):
        convert(tmp_path / "empty", tmp_path / "out")


@pytest.mark.parametrize("data, message", [
    (b"\xff" * 8 + b"{}", "header length, 18446744073709551615 bytes, is past the end"),
    (b"just some text, not a model", "is past the end of the file"),
    (len(b"[]").to_bytes(8, "little") + b"[]", "not a JSON object"),
    (len(b'{"x": {"dtype": "F32", "shape": [2]}}').to_bytes(8, "little")
     + b'{"x": {"dtype": "F32", "shape": [2]}}', "'x' has a malformed header entry"),
    (len(b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}').to_bytes(8, "little")
     + b'{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}' + bytes(8),
     r"'x' of shape \[3\] and dtype F32 does not fill its 8 bytes"),
], ids=["huge-header-length", "text", "list-header", "no-offsets", "short-data"])
def test_malformed_safetensors_files_are_checkpoint_errors(tmp_path, data, message):
    path = write_hf(tmp_path / "m", hf_weights(), hf_config())
    (path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(path)


@pytest.mark.parametrize("config, message", [
    ([1, 2], "expected a JSON object"),
    (hf_config(vocab_size=None), "vocab_size=None must be an integer"),
    (hf_config(num_hidden_layers="2"), "num_layers='2' must be an integer"),
    (hf_config(hidden_size=64.0), "hidden_size=64.0 must be an integer"),
    (hf_config(rope_scaling="llama3"), "malformed model settings"),
    (hf_config(num_attention_heads=0), "malformed model settings"),
], ids=["list", "null", "string", "float", "rope-string", "zero-heads"])
def test_malformed_config_json_is_a_checkpoint_error(tmp_path, config, message):
    path = write_hf(tmp_path / "m", hf_weights(), hf_config())
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(path)


def test_a_changed_source_converts_anew_and_a_missing_one_is_an_error(tmp_path):
    from jaxserve.config import Config
    from jaxserve.loader import checkpoint_dir

    src = write_hf(tmp_path / "hf", hf_weights(seed=1), hf_config())
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(
        str(src / "tokenizer.json"))
    config = Config().replace(model__name="tiny", checkpoint__source=str(src),
                              checkpoint__cache_dir=str(tmp_path / "cache"))
    mesh = make_mesh(MeshConfig())
    first = checkpoint_dir(config, progress=False)
    assert checkpoint_dir(config, progress=False) == first  # converted once, reused
    embedding = lambda d: np.asarray(load(d, mesh)[1]["embedding"])
    np.testing.assert_array_equal(embedding(first), hf_weights(seed=1)["model.embed_tokens.weight"])
    # The same source path with other weights (same model.name): converted anew, not reused.
    (src / "model.safetensors").unlink()
    safetensors.numpy.save_file(hf_weights(seed=2), src / "model.safetensors")
    second = checkpoint_dir(config, progress=False)
    assert second != first
    np.testing.assert_array_equal(embedding(second),
                                  hf_weights(seed=2)["model.embed_tokens.weight"])
    missing = config.replace(checkpoint__source=str(tmp_path / "nope.gguf"))
    with pytest.raises(CheckpointError, match=r"checkpoint.source: .*nope.gguf does not exist"):
        checkpoint_dir(missing, progress=False)


def test_a_mesh_that_cannot_serve_the_model_fails_before_its_conversion(tmp_path):
    from jaxserve.checkpoint.convert import source_identity
    from jaxserve.config import Config
    from jaxserve.errors import ConfigError
    from jaxserve.loader import load_model

    src = write_hf(tmp_path / "hf", hf_weights(seed=1), hf_config())
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(
        str(src / "tokenizer.json"))
    config = Config().replace(model__name="tiny", checkpoint__source=str(src),
                              checkpoint__cache_dir=str(tmp_path / "cache"), mesh__tensor=3,
                              cache__kv_cache_memory=float(2**20), cache__max_model_len=512)
    with pytest.raises(ConfigError, match=r"4 .*3|3 .*4"):  # heads and tensor, both named
        load_model(config, progress=False)
    out = config.checkpoint.converted_path("tiny", source_identity(src))
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


CONVERT = """
import sys
from jaxserve.config import Config
from jaxserve.loader import checkpoint_dir
config = Config().replace(model__name="tiny", checkpoint__source=sys.argv[1],
                          checkpoint__cache_dir=sys.argv[2])
print(checkpoint_dir(config, progress=False))
"""


def test_processes_starting_together_convert_once(tmp_path):
    """Processes that start together on a fresh cache (scripts/launch/local.sh, servers
    sharing a cache) convert one at a time: while one holds the checkpoint's lock the others
    wait, then load what it wrote (before the lock, each removed the other's half-written
    files and both failed). Here the test holds the lock: two processes report that they
    wait on it, nothing is written meanwhile, and once it lets go exactly one converts."""
    from jaxserve.checkpoint.convert import source_identity
    from jaxserve.checkpoint.file_lock import exclusive, lock_path
    from jaxserve.config import Config

    src = write_hf(tmp_path / "hf", hf_weights(seed=3), hf_config())
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")).save(
        str(src / "tokenizer.json"))
    cache = tmp_path / "cache"
    out = Config().replace(checkpoint__cache_dir=str(cache)).checkpoint.converted_path(
        "tiny", source_identity(src))
    with exclusive(lock_path(out), "the test holds the lock"):
        procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(src), str(cache)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for proc in procs:  # each reaches the lock (a process that did not wait ends: EOF)
            while (line := proc.stderr.readline()) and not line.startswith("waiting"):
                pass
            assert line.startswith("waiting for another process converting"), line
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    assert [stdout.strip() for stdout, _ in results] == [str(out)] * 2
    converted = [err for _, err in results if "\nconverting " in "\n" + err]
    assert len(converted) == 1, [err for _, err in results]
    np.testing.assert_array_equal(np.asarray(load(out, make_mesh(MeshConfig()))[1]["embedding"]),
                                  hf_weights(seed=3)["model.embed_tokens.weight"])


def test_the_convert_command_waits_for_the_folders_lock(tmp_path):
    """`jaxserve convert` takes the lock a server's loader takes on the same folder: while
    another process converts into it, the command waits and writes nothing; afterwards it
    finds the folder written and says so (or replaces it with --overwrite)."""
    from jaxserve.checkpoint.file_lock import exclusive, lock_path

    src = write_hf(tmp_path / "hf", hf_weights(seed=4), hf_config())
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jaxserve", "convert", str(src), str(out)]
    with exclusive(lock_path(out), "the test holds the lock"):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        line = proc.stderr.readline()
        assert line.startswith(f"waiting for another process converting into {out}"), line
        assert proc.poll() is None
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
        out.mkdir()  # what the other process wrote meanwhile
        (out / "x").write_text("")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and f"{out} already exists" in err, err


# ----- FP8 checkpoints (compressed-tensors' weight_scale; transformers' weight_scale_inv) --

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


def write_raw(path: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    """A one-file HF directory written byte by byte (the safetensors format: an 8-byte
    header length, a JSON header, the data), so any dtype can be stored."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (path / "model.safetensors").write_bytes(
        len(head).to_bytes(8, "little") + head + b"".join(blobs))
    return path


def fp8_checkpoint(weights: dict, scale_kind: str) -> tuple[dict, dict]:
    """The linear weights as F8_E4M3 with scales; -> (tensors to write, float32 weights the
    reader must return)."""
    fp8_max = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    tensors, expect = {}, {}
    for name, w in weights.items():
        if not name.endswith("_proj.weight"):
            tensors[name] = expect[name] = w
            continue
        stem = name[:-len("weight")]
        if scale_kind == "channel":
            scale = (np.abs(w).max(axis=1, keepdims=True) / fp8_max).astype(np.float32)
            tensors[stem + "weight_scale"] = scale
            tensors[stem + "input_scale"] = np.ones((1,), np.float32)  # unused: ignored
        elif scale_kind == "tensor":
            scale = np.float32(np.abs(w).max() / fp8_max).reshape(1)
            tensors[stem + "weight_scale"] = scale
        else:  # one scale per 128 x 128 block: a single block at these sizes, so vary it
            scale = np.full((1, 1), np.abs(w).max() / fp8_max, np.float32)
            tensors[stem + "weight_scale_inv"] = scale
        q = (w / scale.reshape(-1, 1) if scale.size > 1 else w / scale.reshape(())).astype(
            ml_dtypes.float8_e4m3fn)
        tensors[name] = q
        expect[name] = q.astype(np.float32) * (scale.reshape(-1, 1) if scale.size > 1
                                               else scale.reshape(()))
    return tensors, expect


@pytest.mark.parametrize("scale_kind", ["channel", "tensor", "block"])
def test_fp8_checkpoints_read_as_their_scaled_values(tmp_path, scale_kind):
    tensors, expect = fp8_checkpoint(hf_weights(seed=5), scale_kind)
    src = SafetensorsCheckpoint(write_raw(tmp_path / "m", tensors,
                                          hf_config(torch_dtype="bfloat16")))
    assert src.default_dtype == "bfloat16"  # the config's word: F8 and F32 tensors mixed
    assert_all_equal(streamed(src), expect)


def test_fp8_channel_checkpoint_converts_back_to_its_own_bytes(tmp_path):
    tensors, _ = fp8_checkpoint(hf_weights(seed=6), "channel")
    write_raw(tmp_path / "m", tensors, hf_config())
    convert(tmp_path / "m", tmp_path / "ckpt", progress=False, tokenizer=False,
            quantization="fp8")
    _, params = load(tmp_path / "ckpt", make_mesh(MeshConfig()))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight"):
        path, layer = our_key(name)
        stored = np.asarray(params_at(params, path)[layer])
        assert stored.dtype == ml_dtypes.float8_e4m3fn
        np.testing.assert_array_equal(stored.view(np.uint8),
                                      ours(tensors[name], name).view(np.uint8), err_msg=name)


def params_at(params: dict, path: str):
    for key in path.split("/"):
        params = params[key]
    return params


def test_fp8_checkpoint_errors(tmp_path):
    tensors, _ = fp8_checkpoint(hf_weights(seed=7), "channel")
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    src = SafetensorsCheckpoint(write_raw(tmp_path / "a", tensors, hf_config()))
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight' has no .*weight_scale"):
        streamed(src)
    tensors, _ = fp8_checkpoint(hf_weights(seed=7), "block")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = np.ones((2, 2), np.float32)
    src = SafetensorsCheckpoint(write_raw(tmp_path / "b", tensors, hf_config()))
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' has shape \[2, 2\]"):
        streamed(src)
    # A scale of `out` values in another shape (a block scale [out / 128, in / 128] can have
    # as many) is not taken for one per channel.
    tensors, _ = fp8_checkpoint(hf_weights(seed=7), "channel")
    name = "model.layers.0.mlp.up_proj.weight_scale"
    out = tensors[name].shape[0]
    tensors[name] = tensors[name].reshape(2, out // 2)
    src = SafetensorsCheckpoint(write_raw(tmp_path / "c", tensors, hf_config()))
    with pytest.raises(CheckpointError, match=rf"weight_scale' has shape \[2, {out // 2}\]"):
        streamed(src)


# ----- damaged inputs found at conversion, named, before the weights are written ----------

def word_level_tokenizer(path: Path) -> None:
    tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(V)},
                                                     unk_token="t0")).save(
        str(path / "tokenizer.json"))


def test_a_file_the_header_check_passes_but_safetensors_cannot_read_is_named(tmp_path):
    src = write_hf(tmp_path / "hf", hf_weights(), hf_config())
    word_level_tokenizer(src)
    with open(src / "model.safetensors", "ab") as f:
        f.write(b"xxxxxxxx")  # bytes past the last tensor: safetensors refuses the file
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot read tensor '.*': "):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("damage, message", [
    ("truncated tokenizer.json", "tokenizer.json: not a tokenizer the tokenizers library "
                                 "can load: EOF while parsing"),
    ("corrupt tokenizer.model", "tokenizer.model: not a SentencePiece model"),
    ("no tokenizer", "no tokenizer.json or tokenizer.model in"),
])
def test_a_bad_tokenizer_fails_the_conversion_before_any_weight_is_read(tmp_path, monkeypatch,
                                                                        damage, message):
    from jaxserve.checkpoint import orbax_store

    src = write_hf(tmp_path / "hf", hf_weights(), hf_config())
    if damage == "truncated tokenizer.json":
        word_level_tokenizer(src)
        text = (src / "tokenizer.json").read_text()
        (src / "tokenizer.json").write_text(text[:len(text) // 2])
    elif damage == "corrupt tokenizer.model":
        (src / "tokenizer.model").write_bytes(bytes(100))

    def no_staging(*args, **kwargs):
        raise AssertionError("the weights were read before the tokenizer was checked")

    monkeypatch.setattr(orbax_store, "_stage", no_staging)
    with pytest.raises(CheckpointError, match=message):
        convert(src, tmp_path / "out", progress=False)


def test_convert_into_a_path_under_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    from jaxserve import cli

    src = write_hf(tmp_path / "hf", hf_weights(), hf_config())
    (tmp_path / "afile").write_text("")
    assert cli.main(["convert", str(src), str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    lock = tmp_path / "afile" / "out.lock"
    assert err.startswith(f"jaxserve convert: error: cannot create {lock}, the lock beside "
                          "the output: "), err
    assert "Traceback" not in err
