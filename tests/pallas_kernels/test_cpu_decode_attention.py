"""The CPU decode attention kernel (pallas_kernels/cpu_decode_attention.py) against the
reference's token formulation, the pages it refuses, and where the reference hands it the
work. Skipped where the kernel cannot run (no AVX-512, no C++ compiler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cpu_kernel_marks import needs_cpu_kernels

from pallas_kernels import cpu_decode_attention as kernel
from pallas_kernels.paged_attention import ragged_paged_attention_reference

pytestmark = needs_cpu_kernels


def test_it_is_built_and_registered():
    assert kernel.available()


def batch(seq_lens, tokens_per_seq, *, heads, kv_heads, head_dim, page_size, seed,
          layers=3, pad=2, dtype=np.float32):
    """Pages of `layers` layers at random, each sequence's pages scattered over the pool, and
    the last tokens_per_seq[s] positions of each sequence as its queries, then `pad` padding
    tokens."""
    rng = np.random.default_rng(seed)
    pages_per_seq = max(-(-n // page_size) for n in seq_lens) + 1
    pool = len(seq_lens) * pages_per_seq + 3
    shape = (layers, pool, page_size, kv_heads, head_dim)
    k_pages = rng.standard_normal(shape).astype(dtype)
    v_pages = rng.standard_normal(shape).astype(dtype)
    tables = rng.permutation(pool)[:len(seq_lens) * pages_per_seq].reshape(len(seq_lens), -1)
    starts = np.concatenate([[0], np.cumsum(tokens_per_seq)]).astype(np.int32)
    q = rng.standard_normal((int(starts[-1]) + pad, heads, head_dim)).astype(dtype)
    return tuple(jnp.asarray(a) for a in (q, k_pages, v_pages, tables.astype(np.int32),
                                          np.asarray(seq_lens, np.int32), starts))


def attend(args, layer, **kw):
    q, k_pages, v_pages, tables, seq_lens, starts = args
    return ragged_paged_attention_reference(q, k_pages, v_pages, jnp.int32(layer), tables,
                                            seq_lens, starts, sm_scale=q.shape[-1]**-0.5,
                                            formulation="token", **kw)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize("layer", [0, 2])
def test_matches_the_reference(heads, kv_heads, head_dim, page_size, layer):
    """One key, keys ending inside a page, several pages, and two or three tokens of one
    sequence (each up to its own position); padding tokens come out zero."""
    args = batch([1, 17, 100, 40], [1, 1, 3, 2], heads=heads, kv_heads=kv_heads,
                 head_dim=head_dim, page_size=page_size, seed=heads * page_size + layer)
    want = np.asarray(attend(args, layer))
    got = np.asarray(attend(args, layer, cpu_kernel=True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert np.all(got[-2:] == 0) and np.all(want[-2:] == 0)


def test_the_reference_hands_it_the_token_formulation_only():
    args = batch([30, 9], [1, 1], heads=4, kv_heads=2, head_dim=64, page_size=16, seed=5)
    text = lambda **kw: jax.jit(lambda *a: attend(a, 1, **kw)).lower(*args).as_text()
    assert kernel.TARGET in text(cpu_kernel=True)
    assert kernel.TARGET not in text()


@pytest.mark.parametrize("head_dim, dtype", [(40, np.float32), (64, jnp.bfloat16)])
def test_shapes_it_does_not_take_stay_with_jnp(head_dim, dtype):
    args = batch([30, 9], [1, 1], heads=4, kv_heads=2, head_dim=head_dim, page_size=16,
                 seed=6, dtype=dtype)
    assert not kernel.takes(args[0], args[1])
    text = jax.jit(lambda *a: attend(a, 0, cpu_kernel=True)).lower(*args).as_text()
    assert kernel.TARGET not in text
    np.testing.assert_array_equal(np.asarray(attend(args, 0, cpu_kernel=True), np.float32),
                                  np.asarray(attend(args, 0), np.float32))


def test_a_page_outside_the_pool_is_an_error_not_a_read():
    q, k_pages, v_pages, tables, seq_lens, starts = batch(
        [20], [1], heads=4, kv_heads=2, head_dim=64, page_size=16, seed=7)
    tables = tables.at[0, 1].set(k_pages.shape[1] + 1000)
    with pytest.raises(Exception, match="a page outside the pool"):
        jax.block_until_ready(attend((q, k_pages, v_pages, tables, seq_lens, starts), 0,
                                     cpu_kernel=True))


def test_refuses_what_does_not_fit():
    q = jnp.zeros((2, 4, 64), jnp.float32)
    pages = jnp.zeros((1, 4, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="a table row and a position per token"):
        kernel.cpu_decode_attention(q, pages, pages, 0, jnp.zeros((3, 2), jnp.int32),
                                    jnp.zeros((2,), jnp.int32), sm_scale=0.125)
    with pytest.raises(ValueError, match="do not fit the kernel"):
        kernel.cpu_decode_attention(q, pages, pages.astype(jnp.bfloat16).astype(jnp.float32)[
            :, :2], 0, jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32), sm_scale=0.1)
