"""RoPE and the K/V writes in one launch (pallas_kernels/rope_kv_write.py) against the
model's own ops (models/rope.apply_rope, then XLA's scatter): q rotated, every slot it is
given holding the rotated k and the v, and every other page entry (other layers, other
slots) unchanged. Interpret mode on CPU, compiled on a GPU (skipped elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.model_config import RopeScaling
from jaxserve.models.quant import quantize_vectors
from jaxserve.models.rope import apply_rope, inverse_frequencies
from pallas_kernels.rope_kv_write import rope_and_write_kv

ON_GPU = jax.default_backend() == "gpu"
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=pytest.mark.skipif(not ON_GPU, reason="needs a GPU"))]


def scatter(pages, rows, layer, slots):
    page_size = pages.shape[2]
    return pages.at[layer, slots // page_size, slots % page_size].set(rows.astype(pages.dtype))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("shape", [(3, 5, 4, 9, 3, 64, 7), (2, 9, 16, 32, 8, 128, 40)],
                         ids=["9-over-3-heads", "32-over-8-heads"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_rope_then_scatter(interpret, shape, dtype):
    layers, pages, page_size, heads, kv_heads, head_dim, tokens = shape
    rng = np.random.default_rng(tokens)
    kv_shape = (layers, pages, page_size, kv_heads, head_dim)
    k_pages = jnp.asarray(rng.normal(size=kv_shape), dtype)
    v_pages = jnp.asarray(rng.normal(size=kv_shape), dtype)
    qkv = jnp.asarray(rng.normal(size=(tokens, heads + 2 * kv_heads, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 8000, tokens), jnp.int32)
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, 500000.0,
                                               RopeScaling(8.0, 1.0, 4.0, 8192)))
    slots = jnp.asarray(rng.permutation(pages * page_size)[:tokens], jnp.int32)
    layer = layers - 1
    before = np.asarray(k_pages, np.float32)  # the pages are donated below
    q = apply_rope(qkv[:, :heads], positions, inv_freq)
    k = apply_rope(qkv[:, heads:heads + kv_heads], positions, inv_freq)
    want_k = scatter(k_pages, k, layer, slots)
    want_v = scatter(v_pages, qkv[:, heads + kv_heads:], layer, slots)
    run = jax.jit(lambda *a: rope_and_write_kv(*a, num_heads=heads, interpret=interpret),
                  donate_argnums=(3, 4))
    got_q, got_k, got_v = run(qkv, positions, inv_freq, k_pages, v_pages, jnp.int32(layer),
                              slots)
    f32 = lambda a: np.asarray(a, np.float32)
    # float32 sin/cos differ from XLA's in the last bits: one bf16 step at most
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(f32(got_q), f32(q), rtol=tol, atol=tol)
    np.testing.assert_allclose(f32(got_k), f32(want_k), rtol=tol, atol=tol)
    np.testing.assert_array_equal(f32(got_v), f32(want_v))
    untouched = np.ones(kv_shape[:3], bool)
    untouched[layer, np.asarray(slots) // page_size, np.asarray(slots) % page_size] = False
    np.testing.assert_array_equal(f32(got_k)[untouched], before[untouched])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_new_k_hands_out_the_rotated_k_rows(interpret, dtype):
    """new_k: the rotated k rows come back beside the pages, the same values the pages got."""
    layers, pages, page_size, heads, kv_heads, head_dim, tokens = 2, 9, 16, 32, 8, 128, 40
    rng = np.random.default_rng(5)
    kv_shape = (layers, pages, page_size, kv_heads, head_dim)
    qkv = jnp.asarray(rng.normal(size=(tokens, heads + 2 * kv_heads, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 8000, tokens), jnp.int32)
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, 500000.0, None))
    slots = jnp.asarray(rng.permutation(pages * page_size)[:tokens], jnp.int32)
    k = apply_rope(qkv[:, heads:heads + kv_heads], positions, inv_freq)
    run = jax.jit(lambda *a: rope_and_write_kv(*a, num_heads=heads, new_k=True,
                                               interpret=interpret), donate_argnums=(3, 4))
    got_q, got_k, got_v, got_rows = run(qkv, positions, inv_freq, jnp.zeros(kv_shape, dtype),
                                        jnp.zeros(kv_shape, dtype), jnp.int32(1), slots)
    f32 = lambda a: np.asarray(a, np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    assert got_rows.shape == (tokens, kv_heads, head_dim) and got_rows.dtype == dtype
    np.testing.assert_allclose(f32(got_rows), f32(k), rtol=tol, atol=tol)
    s = np.asarray(slots)
    np.testing.assert_array_equal(f32(got_k)[1, s // page_size, s % page_size], f32(got_rows))


def test_new_k_with_quantized_pages_is_refused():
    pages = jnp.zeros((1, 2, 4, 2, 8), jnp.int8)
    scales = jnp.ones((1, 2, 4, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"^new_k: the k rows as int8 pages hold them"):
        rope_and_write_kv(jnp.zeros((3, 8, 8)), jnp.zeros(3, jnp.int32), jnp.zeros(4), pages,
                          pages, 0, jnp.zeros(3, jnp.int32), num_heads=4, k_scales=scales,
                          v_scales=scales, new_k=True, interpret=True)


def test_mismatched_shapes_are_refused():
    pages = jnp.zeros((1, 2, 4, 2, 8))
    inv_freq = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"qkv \(3, 7, 8\) does not hold 4 q heads"):
        rope_and_write_kv(jnp.zeros((3, 7, 8)), jnp.zeros(3, jnp.int32), inv_freq, pages,
                          pages, 0, jnp.zeros(3, jnp.int32), num_heads=4, interpret=True)
    with pytest.raises(ValueError, match=r"head_dim 8: inv_freq \(3,\)"):
        rope_and_write_kv(jnp.zeros((3, 8, 8)), jnp.zeros(3, jnp.int32), jnp.zeros(3), pages,
                          pages, 0, jnp.zeros(3, jnp.int32), num_heads=4, interpret=True)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_pages_get_what_quantize_vectors_gives(interpret, mode):
    """int8/fp8 pages (cache.kv_dtype): each new K/V vector, rounded to qkv's dtype,
    stored with its scale as quantize_vectors stores them; every other entry unchanged.
    At position 0 RoPE is exactly the identity on every backend, so the bytes must match
    (the rotation itself is tested above, and with quantized pages in
    tests/models/test_llama_numpy.py)."""
    layers, pages, page_size, heads, kv_heads, head_dim, tokens = 2, 9, 16, 32, 8, 128, 40
    rng = np.random.default_rng(7)
    kv_shape = (layers, pages, page_size, kv_heads, head_dim)
    old = [quantize_vectors(jnp.asarray(rng.normal(size=kv_shape), jnp.float32), mode)
           for _ in range(2)]  # (pages, scales) of K and of V
    qkv = jnp.asarray(rng.normal(size=(tokens, heads + 2 * kv_heads, head_dim)) * 3,
                      jnp.bfloat16)
    qkv = qkv.at[0, heads + kv_heads].set(0)  # an all-zero V vector: scale 1, zeros stored
    # too small for a normal scale: XLA on CPU flushes the denormal scale (scale 1, zeros
    # stored), a GPU keeps it; both store what quantize_vectors stores, never NaN
    qkv = qkv.at[1, heads + kv_heads].set(1e-37)
    positions = jnp.zeros(tokens, jnp.int32)
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, 500000.0, None))
    slots = jnp.asarray(rng.permutation(pages * page_size)[:tokens], jnp.int32)
    layer = 1
    k = apply_rope(qkv[:, heads:heads + kv_heads], positions, inv_freq)
    want = []
    for (pages_, scales), new in zip(old, (k, qkv[:, heads + kv_heads:]), strict=True):
        values, scale = quantize_vectors(new, mode)
        want += [scatter(pages_, values, layer, slots), scatter(scales, scale, layer, slots)]
    before = [np.asarray(a.astype(jnp.float32)) for pair in old for a in pair]
    run = jax.jit(lambda qkv, pos, f, kp, vp, ks, vs, layer, slots: rope_and_write_kv(
        qkv, pos, f, kp, vp, layer, slots, num_heads=heads, k_scales=ks, v_scales=vs,
        interpret=interpret), donate_argnums=(3, 4, 5, 6))
    _, got_k, got_v, got_ks, got_vs = run(qkv, positions, inv_freq, old[0][0], old[1][0],
                                          old[0][1], old[1][1], jnp.int32(layer), slots)
    assert got_k.dtype == old[0][0].dtype and got_ks.dtype == jnp.float32
    f32 = lambda a: np.asarray(a.astype(jnp.float32))
    want_k, want_ks, want_v, want_vs = map(f32, want)
    for got, want_ in zip((got_k, got_ks, got_v, got_vs), (want_k, want_ks, want_v, want_vs),
                          strict=True):
        np.testing.assert_array_equal(f32(got), want_)
    at = [(layer, int(slots[t]) // page_size, int(slots[t]) % page_size) for t in (0, 1)]
    # V head 0 of tokens 0 and 1: a zero vector, and the 1e-37 one dequantized
    assert want_vs[at[0]][0] == 1.0 and np.all(want_v[at[0]][0] == 0)
    tiny = want_v[at[1]][0] * want_vs[at[1]][0]
    assert (want_vs[at[1]][0] == 1.0 and np.all(tiny == 0)) or np.allclose(
        tiny, np.float32(jnp.bfloat16(1e-37)), rtol=1 / 16, atol=0)
    untouched = np.ones(kv_shape[:3], bool)
    untouched[layer, np.asarray(slots) // page_size, np.asarray(slots) % page_size] = False
    for got, old_ in zip((got_k, got_ks, got_v, got_vs), before, strict=True):
        np.testing.assert_array_equal(f32(got)[untouched], old_[untouched])


def test_scales_must_come_with_quantized_pages():
    pages, q8 = jnp.zeros((1, 2, 4, 2, 8)), jnp.zeros((1, 2, 4, 2, 8), jnp.int8)
    scales = jnp.ones((1, 2, 4, 2), jnp.float32)
    args = (jnp.zeros((3, 8, 8)), jnp.zeros(3, jnp.int32), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"take float32 k_scales .* \(got None\)"):
        rope_and_write_kv(*args, q8, q8, 0, jnp.zeros(3, jnp.int32), num_heads=4,
                          interpret=True)
    with pytest.raises(ValueError, match=r"exactly when they are int8 or fp8"):
        rope_and_write_kv(*args, pages, pages, 0, jnp.zeros(3, jnp.int32), num_heads=4,
                          k_scales=scales, v_scales=scales, interpret=True)
