"""The q8_0 matmul kernel (pallas_kernels/q8_0_matmul.py) against the product through the
dequantized weight, and qeinsum's use of it for the model's q8_0 einsums. Interpret mode
on CPU, compiled on a GPU (skipped elsewhere)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import quant
from jaxserve.models.quant import dequantize, q8_0_kernel_einsum, qeinsum, quantize
from pallas_kernels.q8_0_matmul import q8_0_matmul, tiling

ON_GPU = jax.default_backend() == "gpu"
# float32 products: exact enough on a CPU; a GPU's float32 dots (XLA's, and Triton's in the
# kernel) run on tf32 tensor cores
TOL = 2e-2 if ON_GPU else 1e-4
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU"))]


def q8_0_weight(k: int, n: int, seed: int):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return quantize(jnp.asarray(w), (0,), "q8_0")  # q [k, n] int8, scale [k // 32, n]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("rows", [1, 7, 16, 40])
@pytest.mark.parametrize("tiles", [(64, 1, 32), (128, 2, 32), (64, 4, 32), (128, 1, 128),
                                   (64, 2, 64)], ids=lambda t: "bn{}-s{}-bk{}".format(*t))
def test_matches_the_dequantized_product(interpret, rows, tiles):
    block_n, splits, block_k = tiles
    q, scale = q8_0_weight(256, 256, seed=rows)
    assert q.dtype == jnp.int8 and scale.shape == (8, 256)
    x = jnp.asarray(np.random.default_rng(rows + 1).standard_normal((rows, 256)), jnp.float32)
    got = q8_0_matmul(x, q, scale, block_n=block_n, splits=splits, block_k=block_k,
                      interpret=interpret)
    assert got.shape == (rows, 256) and got.dtype == jnp.float32
    want = np.asarray(x) @ np.asarray(dequantize(q, scale))
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("block_k", [32, 128])
def test_bfloat16_activations(interpret, block_k):
    q, scale = q8_0_weight(512, 128, seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 512)), jnp.bfloat16)
    got = q8_0_matmul(x, q, scale, block_n=64, splits=4, block_k=block_k, interpret=interpret)
    assert got.dtype == jnp.bfloat16
    want = np.asarray(x, np.float32) @ np.asarray(dequantize(q, scale))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2,
                               atol=2e-2 * np.abs(want).max())


def test_sizes_that_do_not_tile_are_refused():
    q, scale = q8_0_weight(256, 192, seed=0)
    x = jnp.ones((2, 256), jnp.float32)
    with pytest.raises(ValueError, match="N=192 in tiles of 128"):
        q8_0_matmul(x, q, scale, block_n=128, splits=1, interpret=True)
    with pytest.raises(ValueError, match="K=256 in 16 splits"):
        q8_0_matmul(x, q, scale, block_n=64, splits=16, interpret=True)
    with pytest.raises(ValueError, match="steps of 48"):
        q8_0_matmul(x, q, scale, block_n=64, splits=1, block_k=48, interpret=True)
    with pytest.raises(ValueError, match="scale must be"):
        q8_0_matmul(x, q, scale[:4], block_n=64, splits=1, interpret=True)
    assert tiling(256, 192) == {"block_n": 64, "splits": 8, "block_k": 32}
    assert tiling(4096, 4096) == {"block_n": 128, "splits": 16, "block_k": 64}
    assert tiling(256, 100) is None


@pytest.mark.parametrize("eq,w_shape,blocked,x_shape", [
    ("TE,ENH->TNH", (64, 2, 64), 0, (5, 64)),  # q/k/v: blocks along the embedding
    ("TNH,NHE->TE", (3, 64, 128), 1, (4, 3, 64)),  # o_proj: blocks along head_dim
    ("TE,EGF->TGF", (96, 2, 64), 0, (2, 96)),  # gate/up joined
    ("TF,FE->TE", (128, 64), 0, (9, 128)),  # down_proj
])
def test_the_models_einsums_through_the_kernel(eq, w_shape, blocked, x_shape):
    rng = np.random.default_rng(len(eq))
    q, scale = quantize(jnp.asarray(rng.standard_normal(w_shape), jnp.float32), (blocked,), "q8_0")
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    got = q8_0_kernel_einsum(eq, x, q, scale, interpret=True)
    want = np.einsum(eq, np.asarray(x), np.asarray(dequantize(q, scale)))
    assert got is not None and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_einsums_it_cannot_take_are_left_to_xla():
    q, scale = quantize(jnp.ones((64, 100)), (0,), "q8_0")  # 100 outputs: no tile fits
    assert q8_0_kernel_einsum("TE,EF->TF", jnp.ones((2, 64)), q, scale, interpret=True) is None
    q, scale = quantize(jnp.ones((64, 128)), (0,), "q8_0")
    # the weight's outputs before its inputs
    assert q8_0_kernel_einsum("TE,FE->TF", jnp.ones((2, 64)), q.T, scale.T,
                              interpret=True) is None


@pytest.mark.parametrize("rows,kernel", [(8, True), (64, True), (65, False)])
def test_qeinsum_takes_the_kernel_for_decode_sized_batches_on_a_gpu(monkeypatch, rows, kernel):
    """On a GPU (faked here: the kernel then runs in interpret mode) a q8_0 einsum of at most
    Q8_0_KERNEL_ROWS tokens goes through the kernel, larger ones through XLA's einsum of the
    dequantized weight; both give the dequantized product."""
    monkeypatch.setattr(quant, "_q8_0_kernel_here",
                        lambda x: x.shape[0] <= quant.Q8_0_KERNEL_ROWS)
    monkeypatch.setattr(quant, "q8_0_kernel_einsum",
                        functools.partial(q8_0_kernel_einsum, interpret=True))
    q, scale = q8_0_weight(64, 128, seed=rows)
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, 64)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x: qeinsum("TE,EF->TF", x, q, scale))(x))
    assert ("q8_0_matmul" in jaxpr) == kernel
    got = qeinsum("TE,EF->TF", x, q, scale)
    want = np.asarray(x) @ np.asarray(dequantize(q, scale))
    np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL * np.abs(want).max())
