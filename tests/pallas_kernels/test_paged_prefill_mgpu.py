"""The Mosaic GPU paged prefill kernel: its work items, and the kernel and the routed step
against the reference, through Mosaic GPU's interpreter on CPU and compiled on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_steps import paged_step, reference, run_interpreted_checks

from pallas_kernels.flash_prefill import long_chunks, ragged_paged_attention_flash
from pallas_kernels.paged_prefill_mgpu import paged_prefill_mgpu, prefill_items, unsupported


def test_items_are_whole_tiles_of_128_rows_inside_the_taken_sequences():
    # (context, query tokens): 300 rows after 100 cached, a decode, 129 fresh rows, and 30
    # rows after 60 cached (taken, but fewer than 128 rows: left to the caller)
    seq_lens = jnp.asarray([400, 31, 129, 90], jnp.int32)
    query_start = jnp.asarray([0, 300, 301, 430, 460], jnp.int32)
    take = jnp.asarray([True, False, True, True])
    items = np.asarray(prefill_items(seq_lens, query_start, take, 7))
    np.testing.assert_array_equal(items[:, :5], [
        [0, 0, 0, 2, 2],  # sequence
        [0, 128, 172, 301, 302],  # first packed row: a sequence's last item ends at its end
        [128, 128, 128, 128, 128],  # rows
        [100, 228, 272, 0, 1],  # position of the first row
    ])
    np.testing.assert_array_equal(items[2, 5:], 0)  # unused items have no rows
    covered = np.zeros(460, int)
    for first in items[1, :5]:
        covered[first:first + 128] += 1
    assert (covered[:300] > 0).all() and (covered[301:430] > 0).all()
    assert covered[300] == 0 and (covered[430:] == 0).all()


def test_long_chunks_are_later_chunks_of_at_least_min_chunk_tokens():
    seq_lens = jnp.asarray([1024, 600, 2000, 511], jnp.int32)
    query_start = jnp.asarray([0, 512, 1112, 1624, 2135], jnp.int32)
    fresh = jnp.asarray([False, True, False, False])
    assert long_chunks(seq_lens, query_start, fresh, 512).tolist() == [True, False, True,
                                                                     False]


def test_min_chunk_under_one_item_is_refused():
    step = paged_step([(300, 150)], 16, num_tokens=160)
    zeros = jnp.zeros((160, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="min_chunk=64: the paged prefill kernel takes chunks "
                                         "of 128 tokens or more"):
        ragged_paged_attention_flash(**step, k_new=zeros, v_new=zeros, sm_scale=0.125,
                                     min_chunk=64)


@pytest.mark.parametrize("args, match", [
    ((jnp.float32, jnp.float32, 128, 16), "bf16 or f16"),
    ((jnp.bfloat16, jnp.float8_e4m3fn, 128, 16), "bf16 or f16"),
    ((jnp.bfloat16, jnp.bfloat16, 96, 16), "head_dim"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 256), "page_size 256"),
])
def test_unsupported_inputs_are_named(args, match):
    assert match in unsupported(*args)
    assert unsupported(jnp.bfloat16, jnp.bfloat16, 128, 16) is None


def check_kernel(page, interpret=False):
    # chunks after cached prefixes longer than a tile (their last items overlap the one
    # before), a decode, short chunks (fewer than 128 rows: not attended), a fresh prompt
    seqs = [(300, 150), (30, 1), (50, 20), (5, 5), (129, 129), (700, 257), (900, 128)]
    step = paged_step(seqs, page, num_tokens=840)
    take = jnp.asarray([True, False, True, True, False, True, True])
    base = jnp.full_like(step["q"], 7.0)
    out = paged_prefill_mgpu(**step, take=take, out=base, sm_scale=0.125, max_items=12,
                             interpret=interpret)
    out, ref = np.asarray(out, np.float32), reference(step, 0.125)
    rows = np.zeros(840, bool)
    qs = np.asarray(step["query_start"])
    for s in (0, 5, 6):
        rows[qs[s]:qs[s + 1]] = True
    np.testing.assert_allclose(out[rows], ref[rows], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[~rows], 7.0)  # the rest of `out` is left alone


def check_routed_step(interpret=False, heads=8, kv_heads=2, head_dim=128):
    """ragged_paged_attention_flash with long chunks on this kernel, a fresh prompt on the
    flash kernel and the rest (decodes, a short chunk) on the ragged kernel."""
    seqs = [(1000, 600), (40, 1), (300, 300), (90, 30), (2000, 512)]
    num_tokens = 1536
    step = paged_step(seqs, 16, num_tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      seed=1)
    # a fresh prompt's K/V rows are this step's new rows: write them from its pages
    qs, tables = np.asarray(step["query_start"]), np.asarray(step["page_tables"])
    k_new = np.zeros((num_tokens, kv_heads, head_dim), np.float32)
    v_new = np.zeros_like(k_new)
    kp, vp = np.asarray(step["k_pages"], np.float32), np.asarray(step["v_pages"], np.float32)
    for s, (ctx, n) in enumerate(seqs):
        for i in range(n):
            pos = ctx - n + i
            page, off = tables[s, pos // 16], pos % 16
            k_new[qs[s] + i], v_new[qs[s] + i] = kp[1, page, off], vp[1, page, off]
    scale = head_dim ** -0.5
    out = ragged_paged_attention_flash(**step, k_new=jnp.asarray(k_new, jnp.bfloat16),
                                       v_new=jnp.asarray(v_new, jnp.bfloat16), sm_scale=scale,
                                       min_chunk=512, interpret=interpret)
    out, ref = np.asarray(out, np.float32), reference(step, scale)
    np.testing.assert_allclose(out[:qs[-1]], ref[:qs[-1]], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[qs[-1]:], 0.0)


def interpreted_checks():
    """Both checks through Mosaic GPU's interpreter (run in a child process below)."""
    for page in (16, 128):
        check_kernel(page, interpret=True)
    check_routed_step(interpret=True, heads=2, kv_heads=1, head_dim=64)  # the interpreter is slow


CHILD_LIMIT_S = 1200


def test_interpreted_kernel_and_routing_match_reference():
    """On CPU, through the interpreter, in a child process with a time limit: the interpreter
    deadlocked on an earlier version of the kernel, and a deadlock must fail the test, not
    hang the suite."""
    run_interpreted_checks(__file__, CHILD_LIMIT_S)


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 64, 128])
def test_kernel_matches_reference(page):
    if jax.default_backend() != "gpu":
        pytest.skip("the kernel runs compiled on a Hopper GPU only")
    check_kernel(page)


@pytest.mark.gpu
def test_routed_step_matches_reference():
    if jax.default_backend() != "gpu":
        pytest.skip("the compiled kernels need a Hopper GPU")
    check_routed_step()
