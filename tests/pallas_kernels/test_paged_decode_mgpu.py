"""The Mosaic GPU paged decode kernel against the reference: its split merge in XLA, and the
kernel through Mosaic GPU's interpreter on CPU and compiled on a Hopper GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_steps import paged_step, reference, run_interpreted_checks

from pallas_kernels.paged_decode_mgpu import (
    auto_splits,
    merge_partials,
    paged_decode_mgpu,
    split_blocks,
    unsupported,
)


def test_merge_weights_each_split_by_its_sum_of_exponentials():
    # one sequence, one KV head of 2 query heads, 3 partials: the second was never written
    o = np.asarray([[[1.0, 2.0], [3.0, 4.0]], [[np.nan, 9.0], [9.0, 9.0]],
                    [[5.0, 6.0], [7.0, 8.0]]], np.float32)[None]  # [1, 3, 2, 2]
    lse = np.full((1, 3, 1, 64), np.nan, np.float32)  # rows past the group are never read
    lse[0, :, 0, :2] = [[1.0, 0.0], [50.0, 50.0], [3.0, 0.0]]
    written = jnp.asarray([[True, False, True]])
    got = np.asarray(merge_partials(jnp.asarray(o), jnp.asarray(lse), written, group=2))
    w = np.asarray([[2.0, 1.0], [8.0, 1.0]])  # 2 ** lse of the written partials
    want = (w[:, :, None] * o[0, [0, 2]]).sum(0) / w.sum(0)[:, None]
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_merge_gives_zeros_for_a_sequence_without_keys():
    o = jnp.full((1, 2, 4, 8), jnp.nan, jnp.float32)
    lse = jnp.full((1, 2, 2, 64), jnp.nan, jnp.float32)
    got = merge_partials(o, lse, jnp.zeros((1, 2), bool), group=2)
    np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_split_blocks_cover_each_sequence_once():
    for seq_len in (0, 1, 128, 129, 1000):
        covered = []
        for split in range(3):
            first, n = (int(x) for x in split_blocks(jnp.int32(seq_len), split, block_kv=128,
                                                      splits=3))
            covered += range(first, first + n)
        assert covered == list(range(-(-seq_len // 128))), seq_len


def test_auto_splits_fill_the_gpu_but_never_exceed_the_blocks():
    assert auto_splits(1, 8, max_blocks=16) == 16
    assert auto_splits(1, 8, max_blocks=1000) == 32  # MAX_SPLITS
    assert auto_splits(32, 8, max_blocks=16) == 3
    assert auto_splits(256, 8, max_blocks=64) == 1


@pytest.mark.parametrize("args, match", [
    ((jnp.float32, jnp.float32, 128, 16, 4), "bf16 or f16"),
    ((jnp.bfloat16, jnp.int8, 128, 16, 4), "bf16 or f16"),
    ((jnp.bfloat16, jnp.bfloat16, 96, 16, 4), "head_dim"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 256, 4), "page_size 256"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 16, 128), "128 query heads per KV head"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 16, 4, 64, 3), "stages must be a multiple of 2"),
    ((jnp.bfloat16, jnp.bfloat16, 128, 16, 4, 64, 2, 3), "consumers must be 1 or 2"),
])
def test_unsupported_inputs_are_named(args, match):
    assert match in unsupported(*args)
    assert unsupported(jnp.bfloat16, jnp.bfloat16, 128, 16, 4) is None


def check_kernel(page, num_splits=None, heads=8, kv_heads=2, head_dim=64, interpret=False,
                 **blocks):
    """Decodes at contexts that end inside a page, on a page boundary and inside a block, a
    long one split many ways; a chunk and a decode not in `take` keep their rows; padding
    rows past the last sequence too."""
    seqs = [(1, 1), (300, 1), (256, 1), (40, 20), (1000, 1), (77, 1), (129, 1)]
    step = paged_step(seqs, page, num_tokens=32, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim)
    take = jnp.asarray([True, True, True, True, True, False, True])
    base = jnp.full_like(step["q"], 7.0)
    scale = head_dim ** -0.5
    out = paged_decode_mgpu(**step, take=take, out=base, sm_scale=scale,
                            num_splits=num_splits, interpret=interpret, **blocks)
    out, ref = np.asarray(out, np.float32), reference(step, scale)
    qs = np.asarray(step["query_start"])
    rows = np.zeros(32, bool)
    rows[[qs[s] for s in (0, 1, 2, 4, 6)]] = True
    np.testing.assert_allclose(out[rows], ref[rows], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[~rows], 7.0)  # the rest of `out` is left alone


def interpreted_checks():
    """Through Mosaic GPU's interpreter (run in a child process below)."""
    check_kernel(16, num_splits=3, heads=4, kv_heads=1, interpret=True)
    check_kernel(64, num_splits=1, heads=2, kv_heads=2, interpret=True)
    check_kernel(16, num_splits=2, heads=4, kv_heads=2, interpret=True, block_kv=64, consumers=1)
    check_kernel(16, num_splits=1, heads=4, kv_heads=2, interpret=True, consumers=1)  # in place


CHILD_LIMIT_S = 1200


def test_interpreted_kernel_matches_reference():
    """On CPU, through the interpreter, in a child process with a time limit (a deadlock of
    the kernel's barriers must fail the test, not hang the suite)."""
    run_interpreted_checks(__file__, CHILD_LIMIT_S)


@pytest.mark.gpu
@pytest.mark.parametrize("page, num_splits, kv_heads, head_dim, blocks", [
    (16, None, 2, 128, {}), (16, 5, 1, 64, {}), (32, 1, 2, 128, {}), (64, 2, 8, 128, {}),
    (16, None, 2, 128, dict(block_kv=64, consumers=1)),
    (16, 3, 8, 128, dict(block_kv=64, stages=3, consumers=1)),
    (32, 1, 8, 128, dict(block_kv=64, consumers=1))])  # in place
def test_kernel_matches_reference(page, num_splits, kv_heads, head_dim, blocks):
    if jax.default_backend() != "gpu":
        pytest.skip("the kernel runs compiled on a Hopper GPU only")
    check_kernel(page, num_splits, heads=8 if kv_heads < 8 else 32, kv_heads=kv_heads,
                 head_dim=head_dim, **blocks)
