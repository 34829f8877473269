"""q8_0 weights in column tiles (runner.q8_0_tiles, models/q8_0_tiles.py): the layout, the
kernel reading it (interpret mode on CPU, compiled on a GPU), the model's einsums through
it, and an engine loaded so, alone and on a tensor-parallel mesh of host CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import Config
from jaxserve.engine.engine import Engine
from jaxserve.engine.request import SamplingParams
from jaxserve.errors import ConfigError
from jaxserve.loader import check_layer_arrays, load_model
from jaxserve.models import quant
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.q8_0_tiles import Tiled, tile, tile_width_of, tiled_einsum, untile
from jaxserve.models.quant import dequantize, qeinsum, quantize
from pallas_kernels.q8_0_matmul import q8_0_matmul, tiling
from sharding.mesh import MeshConfig

ON_GPU = jax.default_backend() == "gpu"
TOL = 2e-2 if ON_GPU else 1e-4  # a GPU's float32 dots run on tf32 tensor cores
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU"))]


def q8_0(shape, blocked: int, seed: int):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return quantize(jnp.asarray(w), (blocked,), "q8_0")


def test_tiles_hold_each_column_block_contiguously_and_untile_back():
    w = np.arange(64 * 3 * 64).reshape(64, 3, 64)  # [K, heads, head_dim]: N = 192
    assert tile_width_of(w.shape, 1) == 64  # 128 does not divide 192
    t = np.asarray(tile(jnp.asarray(w), 1, 64))
    assert t.shape == (3, 64, 64)
    np.testing.assert_array_equal(t[1], w[:, 1, :])  # tile 1: columns 64..127, every row
    np.testing.assert_array_equal(np.asarray(untile(jnp.asarray(t), w.shape)), w)
    o = np.arange(2 * 32 * 256).reshape(2, 32, 256)  # o_proj [heads, head_dim, embed]
    t = np.asarray(tile(jnp.asarray(o), 2, 128))
    np.testing.assert_array_equal(t[1], o.reshape(64, 256)[:, 128:])
    assert tile_width_of((64, 100), 1) is None and tile_width_of((48, 128), 1) is None


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("k,n", [(256, 256), (512, 192)])
def test_kernel_on_tiles_gives_the_plain_layouts_product(interpret, rows, k, n):
    q, scale = q8_0((k, n), 0, seed=rows)
    x = jnp.asarray(np.random.default_rng(rows + 1).standard_normal((rows, k)), jnp.float32)
    tiles = tiling(k, n)
    bn = tiles["block_n"]
    got = q8_0_matmul(x, tile(q, 1, bn), tile(scale, 1, bn), interpret=interpret, **tiles)
    assert got.shape == (rows, n)
    want = np.asarray(x) @ np.asarray(dequantize(q, scale))
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())
    plain = q8_0_matmul(x, q, scale, interpret=interpret, **tiles)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=TOL,
                               atol=TOL * np.abs(want).max())


def test_tiled_scales_must_fit():
    q, scale = q8_0((256, 128), 0, seed=0)
    with pytest.raises(ValueError, match=r"scale must be \[N // BN, K // 32, BN\]"):
        q8_0_matmul(jnp.ones((2, 256)), tile(q, 1, 64), tile(scale, 1, 64)[:, :4],
                    splits=1, interpret=True)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "dequantized"])
@pytest.mark.parametrize("eq,w_shape,inputs,x_shape", [
    ("TE,ENH->TNH", (64, 2, 64), 1, (5, 64)),  # q/k/v: blocks along the embedding
    ("TNH,NHE->TE", (3, 64, 128), 2, (4, 3, 64)),  # o_proj: blocks along head_dim
    ("TE,EGF->TGF", (96, 2, 64), 1, (2, 96)),  # gate/up joined
    ("TF,FE->TE", (128, 64), 1, (9, 128)),  # down_proj
])
def test_the_models_einsums_on_tiles(eq, w_shape, inputs, x_shape, kernel):
    rng = np.random.default_rng(len(eq))
    q, scale = quantize(jnp.asarray(rng.standard_normal(w_shape), jnp.float32), (inputs - 1,),
                        "q8_0")
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    bn = tile_width_of(w_shape, inputs)
    w = Tiled(tile(q, inputs, bn), w_shape, inputs)
    got = tiled_einsum(eq, x, w, tile(scale, inputs, bn), kernel=kernel, interpret=True)
    want = np.einsum(eq, np.asarray(x), np.asarray(dequantize(q, scale)))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_an_einsum_in_another_order_is_refused():
    q, scale = q8_0((64, 128), 0, seed=1)
    w = Tiled(tile(q, 1, 128), (64, 128), 1)
    with pytest.raises(ValueError, match="got 'TE,EF->FT'"):
        tiled_einsum("TE,EF->FT", jnp.ones((2, 64)), w, tile(scale, 1, 128), kernel=False)


@pytest.mark.parametrize("rows,kernel", [(8, True), (65, False)])
def test_qeinsum_reads_tiles_with_the_kernel_for_decode_batches(monkeypatch, rows, kernel):
    """On a GPU (faked: the kernel runs in interpret mode) at most Q8_0_KERNEL_ROWS tokens
    go through the kernel on the tiles, more through XLA's einsum of the dequantized weight."""
    monkeypatch.setattr(quant, "_q8_0_kernel_here",
                        lambda x: x.shape[0] <= quant.Q8_0_KERNEL_ROWS)
    monkeypatch.setattr(quant, "tiled_einsum", functools.partial(tiled_einsum, interpret=True))
    q, scale = q8_0((64, 128), 0, seed=rows)
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 64)), jnp.float32)
    w = Tiled(tile(q, 1, 128), (64, 128), 1)
    jaxpr = str(jax.make_jaxpr(lambda x: qeinsum("TE,EF->TF", x, w, tile(scale, 1, 128)))(x))
    assert ("q8_0_matmul" in jaxpr) == kernel
    got = qeinsum("TE,EF->TF", x, w, tile(scale, 1, 128))
    want = np.asarray(x) @ np.asarray(dequantize(q, scale))
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())


# ----- an engine with tiled weights: a small random model whose sizes take q8_0 ---------

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + 13 * j) % 509 + 3 for j in range(5 + 9 * i)] for i in range(4)]


def tiles_config(tmp_path, demo_config, tiles: bool, tensor: int = 1) -> Config:
    shape = ModelConfig("llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                        num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                        name="random-q8_0")
    path = tmp_path / "q8_0.json"
    shape.save(path)
    return demo_config.replace(model__dtype="float32", model__quantization="q8_0",
                               checkpoint__source="random", checkpoint__random_shape=str(path),
                               cache__max_model_len=128, cache__kv_cache_memory=float(1 << 20),
                               runner__compilation_cache_dir=None, runner__layer_arrays=True,
                               runner__transposed_weights=False, runner__q8_0_tiles=tiles,
                               mesh=MeshConfig(tensor=tensor))


def run(config: Config) -> tuple[Engine, dict[str, list[int]]]:
    m = load_model(config, progress=False)
    engine = Engine(config, m.model_config, m.params, m.tokenizer, m.mesh)
    for i, ids in enumerate(PROMPTS):
        engine.add_request(ids, GREEDY, f"r{i}")
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert engine.stats().pages_used == 0
    return engine, tokens


def test_an_engine_on_tiles_gives_the_plain_layouts_tokens(tmp_path, demo_config):
    _, want = run(tiles_config(tmp_path, demo_config, tiles=False))
    engine, got = run(tiles_config(tmp_path, demo_config, tiles=True))
    assert got == want and all(len(t) == 8 for t in got.values())
    layer = engine.runner.params["layers_0"]
    # one device: q/k/v joined, [128, 12 heads x 32] -> 3 tiles of 128; gate/up 512 -> 4
    assert layer["attn"]["qkv_proj"]["kernel"].shape == (3, 128, 128)
    assert layer["attn"]["qkv_proj"]["kernel_scale"].shape == (3, 4, 128)
    assert layer["attn"]["o_proj"].shape == (1, 128, 128)
    assert layer["mlp"]["gate_up_proj"].shape == (4, 128, 128)
    assert layer["mlp"]["down_proj"].shape == (1, 256, 128)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs two devices")
def test_tiles_split_over_a_tensor_parallel_mesh(tmp_path, demo_config):
    """Column-parallel weights split over their tiles (each device's 64 columns one tile),
    row-parallel ones over K; q/k/v joined shard by shard, gate and up apart (a joined
    gate/up would be split on its second output axis); the tokens are one device's."""
    _, want = run(tiles_config(tmp_path, demo_config, tiles=True))
    engine, got = run(tiles_config(tmp_path, demo_config, tiles=True, tensor=2))
    assert got == want
    layer = engine.runner.params["layers_0"]
    shards = lambda a: {s.data.shape for s in a.addressable_shards}
    assert "gate_up_proj" not in layer["mlp"]
    qkv = layer["attn"]["qkv_proj"]
    # 4 q and 2 x 4 kv heads of 32: 384 columns, each device's 2 + 2 + 2 heads 3 tiles of 64
    assert qkv["kernel"].shape == (6, 128, 64)
    assert shards(qkv["kernel"]) == {(3, 128, 64)}
    assert shards(qkv["kernel_scale"]) == {(3, 4, 64)}
    assert shards(layer["attn"]["o_proj"]) == {(1, 64, 128)}  # K = 4 heads x 32, halved
    assert shards(layer["attn"]["o_proj_scale"]) == {(1, 2, 128)}
    assert shards(layer["mlp"]["down_proj"]) == {(1, 128, 128)}


def test_tiles_need_layer_arrays_and_dense_layers(demo_config):
    with pytest.raises(ValueError, match=r"q8_0_tiles: needs runner.layer_arrays: true"):
        demo_config.replace(runner__layer_arrays=False, runner__q8_0_tiles=True)
    moe = ModelConfig("mixtral", vocab_size=64, hidden_size=64, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=64)
    config = demo_config.replace(model__quantization="q8_0", runner__layer_arrays=True,
                                 runner__q8_0_tiles=True)
    with pytest.raises(ConfigError, match=r"runner.q8_0_tiles: true cannot be used with "
                                          r".*: expert weights keep their layout"):
        check_layer_arrays(config, moe)
