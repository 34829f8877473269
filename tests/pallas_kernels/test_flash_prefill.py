"""Ragged paged attention with fresh prompts on the flash kernel, against the reference,
on a step that mixes fresh prompts, a decode and a later chunk (interpret mode on CPU,
compiled on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_prefill import fresh_rows, ragged_paged_attention_flash
from pallas_kernels.paged_attention import ragged_paged_attention, ragged_paged_attention_reference

PAGE = 16
# (context length, query tokens): a fresh prompt of 40, a decode, a later chunk of 20 after
# 30 cached tokens, a fresh prompt of 5 (no more than a decode item: the ragged kernel's)
SEQS = [(40, 40), (30, 1), (50, 20), (5, 5)]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64


@pytest.fixture(params=[pytest.param(True, id="interpret"),
                        pytest.param(False, id="compiled", marks=pytest.mark.gpu)])
def interpret(request):
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Pallas kernels need a GPU")
    return request.param


def make_step(num_tokens=80):
    rng = np.random.default_rng(0)
    pages_per_seq = 4
    num_pages = 1 + len(SEQS) * pages_per_seq
    shape = (1, num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k_pages = rng.standard_normal(shape).astype(np.float32)
    v_pages = rng.standard_normal(shape).astype(np.float32)
    tables = 1 + np.arange(len(SEQS) * pages_per_seq, dtype=np.int32).reshape(len(SEQS), -1)
    q_lens = [n for _, n in SEQS]
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((num_tokens, HEADS, HEAD_DIM)).astype(np.float32)
    k_new = rng.standard_normal((num_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v_new = rng.standard_normal((num_tokens, KV_HEADS, HEAD_DIM)).astype(np.float32)
    for s, (ctx, n) in enumerate(SEQS):  # this step's K/V rows go into their slots
        for i in range(n):
            pos = ctx - n + i
            page, off = tables[s, pos // PAGE], pos % PAGE
            k_pages[0, page, off] = k_new[query_start[s] + i]
            v_pages[0, page, off] = v_new[query_start[s] + i]
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    return dict(q=bf16(q), k_pages=bf16(k_pages), v_pages=bf16(v_pages), layer=jnp.int32(0),
                page_tables=jnp.asarray(tables),
                seq_lens=jnp.asarray([c for c, _ in SEQS], jnp.int32),
                query_start=jnp.asarray(query_start), k_new=bf16(k_new), v_new=bf16(v_new))


def test_fresh_rows_picks_whole_prompts_longer_than_a_decode_item():
    step = make_step()
    fresh, row_fresh, kv_start = fresh_rows(step["seq_lens"], step["query_start"], 80, 16)
    assert fresh.tolist() == [True, False, False, False]
    assert row_fresh.tolist() == [True] * 40 + [False] * 40
    # fresh rows start at their prompt's first row; the others' rows at themselves; the
    # padding rows (66 query tokens of 80) after every row, so that they see no key
    assert kv_start.tolist() == [0] * 40 + list(range(40, 66)) + [80] * 14


def test_matches_reference_on_a_mixed_step(interpret):
    step = make_step()
    scale = HEAD_DIM ** -0.5
    out = ragged_paged_attention_flash(**step, sm_scale=scale, interpret=interpret)
    ref_args = {k: v for k, v in step.items() if k not in ("k_new", "v_new")}
    with jax.default_matmul_precision("highest"):
        ref = ragged_paged_attention_reference(**ref_args, sm_scale=scale)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    valid = int(step["query_start"][-1])
    np.testing.assert_allclose(out[:valid], ref[:valid], atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(out[valid:], 0.0)  # padding rows


def test_ragged_kernel_skips_the_fresh_prompts(interpret):
    step = make_step()
    args = {k: v for k, v in step.items() if k not in ("k_new", "v_new")}
    skip = jnp.asarray([True, False, True, False])
    out = ragged_paged_attention(**args, sm_scale=0.125, interpret=interpret, skip=skip)
    ref = ragged_paged_attention(**args, sm_scale=0.125, interpret=interpret)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    skipped = np.zeros(80, bool)
    skipped[0:40] = skipped[41:61] = True  # sequences 0 and 2
    np.testing.assert_array_equal(out[skipped], 0.0)
    np.testing.assert_array_equal(out[~skipped], ref[~skipped])
    assert np.abs(ref[skipped]).max() > 0


def test_ragged_kernel_writes_its_rows_into_out(interpret):
    """With `out`, the rows of skipped sequences and the padding rows keep out's values and
    every other row is the kernel's own (the flash path passes the flash kernel's output)."""
    step = make_step()
    args = {k: v for k, v in step.items() if k not in ("k_new", "v_new")}
    skip = jnp.asarray([True, False, True, False])
    init = jnp.asarray(np.random.default_rng(1).standard_normal((80, HEADS, HEAD_DIM)),
                       jnp.bfloat16)
    out = ragged_paged_attention(**args, sm_scale=0.125, interpret=interpret, skip=skip,
                                 out=init)
    ref = ragged_paged_attention(**args, sm_scale=0.125, interpret=interpret, skip=skip)
    out, ref, init = (np.asarray(a, np.float32) for a in (out, ref, init))
    kept = np.zeros(80, bool)
    kept[0:40] = kept[41:61] = kept[66:] = True  # sequences 0 and 2, and the padding rows
    np.testing.assert_array_equal(out[kept], init[kept])
    np.testing.assert_array_equal(out[~kept], ref[~kept])
    with pytest.raises(ValueError, match="out must have q's shape"):
        ragged_paged_attention(**args, sm_scale=0.125, interpret=interpret, skip=skip,
                               out=init[:40])
