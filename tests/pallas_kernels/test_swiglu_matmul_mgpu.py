"""The gate/up product with SwiGLU in its epilogue (pallas_kernels/swiglu_matmul_mgpu.py), in
Mosaic GPU's interpreter on CPU, against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swiglu_matmul_mgpu import Tiles, reference, swiglu_matmul


def _inputs(t, e, f, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, e)).astype(np.float32)
    w = (rng.standard_normal((e, 2, f)) / np.sqrt(e)).astype(np.float32)
    return jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)


def _numpy_swiglu(x, w):
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    g, u = x @ w[:, 0], x @ w[:, 1]
    return g / (1 + np.exp(-g)) * u


def test_reference_matches_numpy():
    x, w = _inputs(16, 32, 64)
    want = _numpy_swiglu(x, w)
    np.testing.assert_allclose(np.asarray(reference(x, w), np.float32), want,
                               rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("programs", [1, 3])
def test_kernel_matches_numpy_in_interpret_mode(programs):
    # 2 row tiles x 2 column tiles of two consumers: with 1 or 3 programs the persistent
    # loop hands each program several tiles, in the snake's order
    tiles = Tiles(rows=64, cols=64, depth=64, stages=2, snake=2)
    x, w = _inputs(128, 128, 256)
    out = swiglu_matmul(x, w, tiles, programs=programs, interpret=True)
    assert out.shape == (128, 256) and out.dtype == jnp.bfloat16
    want = _numpy_swiglu(x, w)
    np.testing.assert_allclose(np.asarray(out, np.float32), want,
                               rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("shape, message", [
    ((100, 128, 256), "rows"), ((128, 128, 192), "F=192"), ((128, 96, 256), "K=96")])
def test_shapes_the_tiles_do_not_divide_are_refused(shape, message):
    t, e, f = shape
    x = jnp.zeros((t, e), jnp.bfloat16)
    w = jnp.zeros((e, 2, f), jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        swiglu_matmul(x, w, Tiles(rows=64, cols=64, depth=64, stages=2), programs=1,
                      interpret=True)


def test_a_weight_not_shaped_gate_up_is_refused():
    with pytest.raises(ValueError, match=r"want gate_up \[128, 2, F\]"):
        swiglu_matmul(jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((128, 512), jnp.bfloat16),
                      programs=1, interpret=True)
