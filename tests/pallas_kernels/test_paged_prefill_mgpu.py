"""The Mosaic GPU paged prefill kernel: its work items (on any backend), and the kernel
against the reference, compiled on a Hopper GPU (it has no interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_prefill import long_chunks, ragged_paged_attention_flash
from pallas_kernels.paged_attention import ragged_paged_attention_reference
from pallas_kernels.paged_prefill_mgpu import (
    item_rows,
    paged_prefill_mgpu,
    prefill_items,
    unsupported,
)


def test_items_cover_the_taken_sequences_in_tiles_of_128_rows():
    # (context, query tokens): 300 rows after 100 cached, a decode, 129 fresh rows
    seq_lens = jnp.asarray([400, 31, 129], jnp.int32)
    query_start = jnp.asarray([0, 300, 301, 430], jnp.int32)
    take = jnp.asarray([True, False, True])
    items = np.asarray(prefill_items(seq_lens, query_start, take, 7))
    np.testing.assert_array_equal(items[:, :5], [
        [0, 0, 0, 2, 2],  # sequence
        [0, 128, 256, 301, 429],  # first packed row
        [128, 128, 44, 128, 1],  # rows
        [100, 228, 356, 0, 128],  # position of the first row
    ])
    np.testing.assert_array_equal(items[2, 5:], 0)  # unused items have no rows
    # each taken row is found again in the items' tiles; the decode and padding are not taken
    src, taken = (np.asarray(a) for a in item_rows(query_start, take, 440))
    assert taken.tolist() == [True] * 300 + [False] + [True] * 129 + [False] * 10
    item, offset = src[taken] // 128, src[taken] % 128
    np.testing.assert_array_equal(items[1][item] + offset, np.flatnonzero(taken))
    assert (offset < items[2][item]).all()


def test_long_chunks_are_later_chunks_of_at_least_min_chunk_tokens():
    seq_lens = jnp.asarray([1024, 600, 2000, 511], jnp.int32)
    query_start = jnp.asarray([0, 512, 1112, 1624, 2135], jnp.int32)
    fresh = jnp.asarray([False, True, False, False])
    assert long_chunks(seq_lens, query_start, fresh, 512).tolist() == [True, False, True,
                                                                     False]


@pytest.mark.parametrize("args, match", [
    ((jnp.float32, jnp.float32, 128, 16), "bf16 or f16"),
    ((jnp.bfloat16, jnp.float8_e4m3fn, 128, 16), "bf16 or f16"),
    ((jnp.bfloat16, jnp.bfloat16, 96, 16), "head_dim"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 256), "page_size 256"),
])
def test_unsupported_inputs_are_named(args, match):
    assert match in unsupported(*args)
    assert unsupported(jnp.bfloat16, jnp.bfloat16, 128, 16) is None


def paged_step(seqs, page, num_tokens, heads=4, kv_heads=2, head_dim=64, seed=0):
    """Random pages, tables in a shuffled order, and q for sequences of (context, query
    tokens); this step's rows are the last query tokens of each context."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-max(c for c, _ in seqs) // page)
    shape = (2, 1 + len(seqs) * pages_per_seq, page, kv_heads, head_dim)
    tables = 1 + rng.permutation(len(seqs) * pages_per_seq).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    return dict(q=bf16(rng.standard_normal((num_tokens, heads, head_dim))),
                k_pages=bf16(rng.standard_normal(shape)), v_pages=bf16(rng.standard_normal(shape)),
                layer=jnp.int32(1), page_tables=jnp.asarray(tables.reshape(len(seqs), -1)),
                seq_lens=jnp.asarray([c for c, _ in seqs], jnp.int32),
                query_start=jnp.asarray(query_start))


def reference(step, scale):
    with jax.default_matmul_precision("highest"):
        return np.asarray(ragged_paged_attention_reference(**step, sm_scale=scale), np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64, 128])
def test_kernel_matches_reference(page):
    if jax.default_backend() != "gpu":
        pytest.skip("the kernel runs compiled on a Hopper GPU only")
    # chunks after cached prefixes, one longer than a tile, a decode, a fresh prompt, and
    # chunks that start inside the second consumer's rows
    seqs = [(300, 150), (30, 1), (50, 20), (5, 5), (129, 129), (700, 257)]
    step = paged_step(seqs, page, num_tokens=640)
    take = jnp.asarray([True, False, True, True, False, True])
    base = jnp.full_like(step["q"], 7.0)
    out = paged_prefill_mgpu(**step, take=take, out=base, sm_scale=0.125, max_items=12)
    out, ref = np.asarray(out, np.float32), reference(step, 0.125)
    rows = np.zeros(640, bool)
    qs = np.asarray(step["query_start"])
    for s in np.flatnonzero(np.asarray(take)):
        rows[qs[s]:qs[s + 1]] = True
    np.testing.assert_allclose(out[rows], ref[rows], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[~rows], 7.0)  # the rest of `out` is left alone


@pytest.mark.gpu
def test_routed_step_matches_reference():
    """ragged_paged_attention_flash with long chunks on this kernel, a fresh prompt on the
    flash kernel and the rest (decodes, a short chunk) on the ragged kernel."""
    if jax.default_backend() != "gpu":
        pytest.skip("the kernel runs compiled on a Hopper GPU only")
    seqs = [(1000, 600), (40, 1), (300, 300), (90, 30), (2000, 512)]
    num_tokens = 1536
    step = paged_step(seqs, 16, num_tokens, heads=8, kv_heads=2, head_dim=128, seed=1)
    # a fresh prompt's K/V rows are this step's new rows: write them from its pages
    qs, tables = np.asarray(step["query_start"]), np.asarray(step["page_tables"])
    k_new = np.zeros((num_tokens, 2, 128), np.float32)
    v_new = np.zeros_like(k_new)
    kp, vp = np.asarray(step["k_pages"], np.float32), np.asarray(step["v_pages"], np.float32)
    for s, (ctx, n) in enumerate(seqs):
        for i in range(n):
            pos = ctx - n + i
            page, off = tables[s, pos // 16], pos % 16
            k_new[qs[s] + i], v_new[qs[s] + i] = kp[1, page, off], vp[1, page, off]
    scale = 128 ** -0.5
    out = ragged_paged_attention_flash(**step, k_new=jnp.asarray(k_new, jnp.bfloat16),
                                       v_new=jnp.asarray(v_new, jnp.bfloat16), sm_scale=scale,
                                       min_chunk=512)
    out, ref = np.asarray(out, np.float32), reference(step, scale)
    np.testing.assert_allclose(out[:qs[-1]], ref[:qs[-1]], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[qs[-1]:], 0.0)
