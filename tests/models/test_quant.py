"""Weight-only quantization (models/quant.py): the quantize/dequantize arithmetic against
numpy and ml_dtypes, the quantized model on the demo against float32, quantized MoE experts
against their dequantized weights, `convert --quantize`, quantized weights on a mesh, the
quantized KV cache, and the errors for settings that cannot work."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxserve import cli
from jaxserve.checkpoint import orbax_store
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.errors import ConfigError
from jaxserve.loader import LoadedModel, load_model
from jaxserve.models.llama import flatten_params, nest_params, param_specs
from jaxserve.models.quant import SCALE, dequantize, qeinsum, quantize, quantized_weights
from jaxserve.quality import compare, score
from sharding.mesh import MeshConfig

TEXT = Path(__file__).resolve().parents[2] / "bench" / "texts" / "public-domain-sample.txt"
MOE_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_hf"


def weights(seed=0, shape=(3, 40, 5, 8)):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[1, :, 2, 3] = 0.0  # an all-zero output channel
    w[2, 7, 1, 1] = 25.0  # an outlier
    return w


# ----- the arithmetic ---------------------------------------------------------------------

def test_int8_round_trip_against_numpy():
    w = weights()
    amax = np.abs(w).max(axis=1)
    want_scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    want_q = np.clip(np.rint(w / want_scale[:, None]), -127, 127).astype(np.int8)
    for x in (w, jnp.asarray(w)):  # numpy at conversion, jax when quantizing on load
        q, scale = quantize(x, (1,), "int8")
        assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 5, 8)
        np.testing.assert_array_equal(np.asarray(q), want_q)
        np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-7)
    back = dequantize(*quantize(w, (1,), "int8"), (1,))
    assert np.all(np.abs(back - w) <= want_scale[:, None] / 2 * (1 + 1e-6))
    assert np.all(back[1, :, 2, 3] == 0) and back[2, 7, 1, 1] == pytest.approx(25.0)


def test_fp8_round_trip_against_ml_dtypes():
    w = weights(1)
    amax = np.abs(w).max(axis=(1, 2), keepdims=True)  # two contracted axes, as o_proj has
    scale = np.where(amax > 0, amax / 448, 1).astype(np.float32)
    want = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    for x in (w, jnp.asarray(w)):
        q, s = quantize(x, (1, 2), "fp8")
        assert np.asarray(q).dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.shape == (3, 8)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want.view(np.uint8))
    back = dequantize(*quantize(w, (1, 2), "fp8"), (1, 2))
    # e4m3 keeps 3 mantissa bits: at most 1/16 relative error, once above its normal range
    assert np.all(np.abs(back - w) <= np.abs(w) / 16 + scale * 2.0**-6)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_einsum_is_the_einsum_of_the_dequantized_weight(mode):
    w = weights(2)[0]  # [E, N, H], contracted over E like q_proj
    x = np.random.default_rng(3).standard_normal((6, 40)).astype(np.float32)
    q, scale = quantize(jnp.asarray(w), (0,), mode)
    got = qeinsum("TE,ENH->TNH", jnp.asarray(x), q, scale)
    want = np.einsum("TE,ENH->TNH", x, dequantize(np.asarray(q), np.asarray(scale), (0,)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----- the demo model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_ids(demo_model):
    return demo_model.tokenizer.encode(TEXT.read_text())[:1025]


@pytest.fixture(scope="module")
def float32_score(demo_model, text_ids):
    return score(demo_model, text_ids, "float32")


# Teacher-forced top-1 agreement with float32 over the first 1024 positions of the sample:
# measured 95.9% (int8) and 88.5% (fp8); the bounds sit just below, to catch regressions.
# docs/quantization.md has the figures over the whole sample.
@pytest.mark.parametrize("mode,storage,agreement", [("int8", np.int8, 0.95),
                                                    ("fp8", jnp.float8_e4m3fn, 0.875)])
def test_quantized_demo_tracks_float32(demo_config, float32_score, text_ids, mode, storage,
                                       agreement):
    loaded = load_model(demo_config.replace(model__quantization=mode), progress=False)
    flat = flatten_params(loaded.params)
    c = loaded.model_config
    assert c.quantization == mode
    assert flat["layers/mlp/down_proj"].dtype == storage
    assert flat["layers/mlp/down_proj_scale"].shape == (c.num_layers, c.hidden_size)
    assert flat["layers/attn/o_proj_scale"].shape == (c.num_layers, c.hidden_size)
    assert flat["layers/attn/k_proj/kernel_scale"].shape == (c.num_layers, c.num_kv_heads,
                                                             c.head_dim)
    assert flat["embedding"].dtype == jnp.float32  # the embedding and LM head stay
    result = compare(float32_score, score(loaded, text_ids, "float32"))
    assert result["top1_agreement"] >= agreement
    assert result["perplexity"] <= result["perplexity_reference"] * 1.05


def greedy(config, prompts, mesh=None):
    config = config.replace(mesh=mesh or MeshConfig())
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"r{i}")
    out = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert engine.stats().pages_used == 0
    return out


def assert_meshes_give_the_tokens_of_one_device(config, tokenizer):
    """Greedy tokens on `tensor: 3` and on `pipeline: 2` equal those on one device."""
    prompts = [tokenizer.encode(t) for t in
               ("The capital of France is", "def fibonacci(n):", "List three colors:")]
    one = greedy(config, prompts)
    assert greedy(config, prompts, MeshConfig(tensor=3)) == one
    assert greedy(config, prompts, MeshConfig(pipeline=2)) == one


def test_int8_on_a_mesh_gives_the_tokens_of_one_device(demo_config, demo_model):
    config = demo_config.replace(model__quantization="int8", cache__max_model_len=128,
                                 cache__kv_cache_memory=float(12 << 20),
                                 runner__compilation_cache_dir=None)
    assert_meshes_give_the_tokens_of_one_device(config, demo_model.tokenizer)


# ----- convert --quantize ---------------------------------------------------------------

def test_convert_quantize_stores_int8_and_loads_like_quantizing_on_load(tmp_path, demo_gguf,
                                                                        demo_config, capsys):
    out = tmp_path / "int8"
    assert cli.main(["convert", str(demo_gguf), str(out), "--quantize", "int8"]) == 0
    assert "linear layers in int8" in capsys.readouterr().out
    stored = orbax_store._stored_arrays(out / orbax_store.PARAMS_DIR)
    assert stored["layers/mlp/gate_proj"][1] == np.int8
    assert stored["layers/mlp/gate_proj_scale"][1] == np.float32
    assert stored["embedding"][1] == np.float32
    assert orbax_store.read_config(out).quantization == "int8"

    from_disk = load_model(demo_config.replace(checkpoint__source=str(out),
                                               model__quantization="int8"), progress=False)
    on_load = load_model(demo_config.replace(model__quantization="int8"), progress=False)
    a, b = flatten_params(from_disk.params), flatten_params(on_load.params)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)

    with pytest.raises(ConfigError, match="model.quantization: none asked, but the "
                                          "checkpoint's linear layers are stored in int8"):
        load_model(demo_config.replace(checkpoint__source=str(out)), progress=False)


# ----- settings that cannot work --------------------------------------------------------

def test_unknown_quantization_names_the_key(demo_config):
    with pytest.raises(ValueError, match=r"quantization: must be one of .* \(got 'int4'\)"):
        demo_config.replace(model__quantization="int4")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """{name: converted float32 checkpoint} of the seeded tiny MoE models."""
    out = {}
    for name in ("mixtral", "qwen3_moe"):
        dest = tmp_path_factory.mktemp("moe") / name
        assert cli.main(["convert", str(MOE_FIXTURES / name), str(dest), "--dtype",
                         "float32"]) == 0
        out[name] = dest
    return out


@pytest.mark.parametrize("name,expert_path", [("mixtral", "layers/moe/gate_proj"),
                                              ("qwen3_moe", "moe/gate_proj")])
def test_quantized_experts_compute_with_their_dequantized_weights(demo_config, tiny_moe,
                                                                   name, expert_path):
    config = demo_config.replace(
        checkpoint__source=str(tiny_moe[name]), model__name=name, model__dtype="float32",
        model__quantization="int8", runner__token_buckets=(16, 64), runner__seq_buckets=(4,),
        scheduler__max_num_seqs=4, scheduler__max_num_batched_tokens=64,
        cache__max_model_len=128, cache__kv_cache_memory=float(1 << 20),
        runner__compilation_cache_dir=None)
    quantized = load_model(config, progress=False)
    c, flat = quantized.model_config, flatten_params(quantized.params)
    assert flat[expert_path].dtype == np.int8  # one scale per expert and output channel
    assert flat[expert_path + "_scale"].shape == (*flat[expert_path].shape[:2],
                                                  c.moe_intermediate_size)
    assert flat[expert_path.replace("gate", "down") + "_scale"].shape == (
        *flat[expert_path].shape[:2], c.hidden_size)
    # The same model with every quantized weight turned back into float32 must compute
    # the same logits: the scales apply to the right experts and channels.
    floats = {k: v for k, v in flat.items() if not k.endswith(SCALE)}
    for path, axes in quantized_weights(param_specs(c)).items():
        floats[path] = dequantize(flat[path], flat[path + SCALE], axes)
    dequantized = LoadedModel(dataclasses.replace(c, quantization="none"),
                              nest_params(floats), None, quantized.mesh)
    ids = [t for case in json.loads((MOE_FIXTURES / "golden.json").read_text())[name]["cases"]
           for t in case["prompt_ids"]]
    got, want = score(quantized, ids, "float32"), score(dequantized, ids, "float32")
    np.testing.assert_array_equal(got.argmax, want.argmax)
    np.testing.assert_allclose(got.nll, want.nll, rtol=1e-4, atol=1e-4)
    # and the experts shard with their scales: same tokens on an expert x tensor mesh
    prompts = [ids[:9], ids[9:20]]
    assert greedy(config, prompts, MeshConfig(expert=2, tensor=2)) == greedy(config, prompts)


def test_quantized_params_live_on_their_devices(demo_config):
    config = demo_config.replace(model__quantization="int8", cache__max_model_len=128,
                                 cache__kv_cache_memory=float(12 << 20),
                                 mesh=MeshConfig(tensor=3))
    flat = flatten_params(load_model(config, progress=False).params)
    # column-parallel q_proj: heads split, and so is its scale; row-parallel o_proj: its
    # output (embed) stays whole, and so does its scale
    q, q_scale = flat["layers/attn/q_proj/kernel"], flat["layers/attn/q_proj/kernel_scale"]
    assert {s.data.shape for s in q.addressable_shards} == {(30, 576, 3, 64)}
    assert {s.data.shape for s in q_scale.addressable_shards} == {(30, 3, 64)}
    o_scale = flat["layers/attn/o_proj_scale"]
    assert {s.data.shape for s in o_scale.addressable_shards} == {(30, 576)}
    assert len(jax.devices()) >= 3


# ----- a quantized KV cache (cache.kv_dtype) --------------------------------------------

# Over the first 1024 positions: measured 97.1% (int8) and 93.6% (fp8); the bar for
# an int8 or fp8 cache is 97%, which int8 meets.
@pytest.mark.parametrize("kv_dtype,agreement", [("int8", 0.97), ("fp8", 0.93)])
def test_quantized_kv_cache_tracks_float32(demo_model, float32_score, text_ids, kv_dtype,
                                           agreement):
    result = compare(float32_score, score(demo_model, text_ids, "float32", kv_dtype=kv_dtype))
    assert result["top1_agreement"] >= agreement
    assert result["perplexity"] <= result["perplexity_reference"] * 1.02


@pytest.mark.parametrize("kv_dtype,storage", [("int8", np.int8), ("fp8", jnp.float8_e4m3fn)])
def test_engine_with_a_quantized_kv_cache(demo_config, demo_model, kv_dtype, storage):
    budget = 12 << 20
    config = demo_config.replace(cache__kv_dtype=kv_dtype, cache__max_model_len=128,
                                 cache__kv_cache_memory=float(budget),
                                 runner__compilation_cache_dir=None)
    assert_meshes_give_the_tokens_of_one_device(config, demo_model.tokenizer)

    m = demo_model
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    c, state = m.model_config, engine.runner.state
    # one byte per element plus a float32 scale per (token, KV head), for K and V
    page_bytes = 2 * c.num_layers * 16 * c.num_kv_heads * (c.head_dim + 4)
    assert engine.runner.num_pages == budget // page_bytes
    assert state.k_pages.dtype == storage and state.v_pages.dtype == storage
    assert [s.shape for s in state.kv_scales] == [state.k_pages.shape[:4]] * 2
    assert all(s.dtype == jnp.float32 for s in state.kv_scales)


def test_unknown_kv_dtype_names_the_key(demo_config):
    with pytest.raises(ValueError, match=r"kv_dtype: must be one of .* \(got 'int4'\)"):
        demo_config.replace(cache__kv_dtype="int4")
