"""Ragged paged attention that hands fresh prompts to the flash kernel.

A fresh prompt is a sequence whose query tokens this step are its whole context (a first
prefill chunk, no cached prefix) and more than one decode item (`block_q_decode` tokens):
its keys are exactly this step's K/V rows, so causal flash attention over those rows gives
its output without reading the pages. On an H200 the Mosaic GPU flash kernel runs such
prompts at 0.85-1.0x cuDNN against 0.42-0.46x for the ragged kernel's prefill phase
(`scripts/bench_kernels.py`, docs/performance.md). Every other sequence (decodes, later
chunks) goes through `ragged_paged_attention`, which skips the fresh ones.

With `min_chunk` (128 or more: the kernel's item), a later chunk of at least that many
tokens (a long prompt's second chunk, or a prompt after a cached prefix) goes to the Mosaic
GPU paged prefill kernel (`paged_prefill_mgpu.py`), which reads its keys from the pages at
2.0-2.3x the speed of the ragged kernel's Triton prefill phase on an H200; its call cost a
step with no such chunk 6-12 us per layer at min_chunk 512 (docs/performance.md). The runner
sets min_chunk where the kernel takes the KV pages (`runner.paged_prefill`); here other
inputs (quantized pages, other page sizes) keep those chunks on the ragged kernel.

Same arguments and result as `ragged_paged_attention`, plus this step's K/V rows (k_new,
v_new [T, KVH, D]) as the pages hold them: with int8/fp8 pages, dequantized, so a fresh
prompt attends the same keys as every other row and the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import sequence_rows
from pallas_kernels.flash_attention_mgpu import TILE_Q, flash_attention_rows
from pallas_kernels.paged_attention import BlockSizes, ragged_paged_attention
from pallas_kernels.paged_prefill_mgpu import paged_prefill_mgpu, unsupported


def fresh_rows(seq_lens, query_start, num_tokens, min_tokens):
    """(fresh [S], row_fresh [T], kv_start [T]): the sequences that are fresh prompts of more
    than min_tokens, the rows in them, and each row's first key row for the flash kernel:
    its sequence's first row if fresh; the row itself for the other sequences' rows (a
    one-key window, which the ragged kernel's rows overwrite); num_tokens for padding rows
    (no key: zeros), which keeps kv_start non-decreasing."""
    q_len = query_start[1:] - query_start[:-1]
    fresh = (q_len == seq_lens) & (q_len > min_tokens)
    seq, valid = sequence_rows(query_start, num_tokens)
    seq = jnp.minimum(seq, seq_lens.shape[0] - 1)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    row_fresh = valid & fresh[seq]
    kv_start = jnp.where(row_fresh, query_start[seq], jnp.where(valid, t, num_tokens))
    return fresh, row_fresh, kv_start.astype(jnp.int32)


def long_chunks(seq_lens, query_start, fresh, min_chunk):
    """[S] bool: the sequences that are not fresh prompts and have min_chunk query tokens or
    more this step."""
    q_len = query_start[1:] - query_start[:-1]
    return ~fresh & (q_len >= min_chunk)


DEFAULT_BLOCKS = BlockSizes()


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret",
                                             "min_chunk"))
def ragged_paged_attention_flash(q, k_pages, v_pages, layer, page_tables, seq_lens,
                                 query_start, *, k_new, v_new, sm_scale: float,
                                 block_sizes: BlockSizes = DEFAULT_BLOCKS,
                                 interpret: bool = False, k_scales=None, v_scales=None,
                                 min_chunk: int | None = None):
    if min_chunk is not None and min_chunk < TILE_Q:
        raise ValueError(f"min_chunk={min_chunk}: the paged prefill kernel takes chunks of "
                         f"{TILE_Q} tokens or more")
    num_tokens, num_heads, _ = q.shape
    _, _, page_size, kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_tables.shape
    min_tokens = block_sizes.resolve(group=num_heads // kv_heads, num_seqs=num_seqs,
                                     kv_heads=kv_heads,
                                     max_kv_len=pages_per_seq * page_size).block_q_decode
    fresh, _, kv_start = fresh_rows(seq_lens, query_start, num_tokens, min_tokens)
    # quantized pages (k_scales) have a dtype the kernel does not take
    chunks = (min_chunk is not None and num_tokens >= min_chunk
              and unsupported(q.dtype, k_pages.dtype, q.shape[-1], page_size) is None)
    skip = fresh
    if chunks:
        long = long_chunks(seq_lens, query_start, fresh, min_chunk)
        skip = fresh | long
    # The flash kernel's output is the buffer the other kernels write their rows into: a
    # fresh prompt's rows (and the padding rows, zeros) are its own, no select merges them.
    out = flash_attention_rows(q, k_new.astype(q.dtype), v_new.astype(q.dtype), kv_start,
                               sm_scale=sm_scale, interpret=interpret)
    out = ragged_paged_attention(q, k_pages, v_pages, layer, page_tables, seq_lens,
                                 query_start, sm_scale=sm_scale, block_sizes=block_sizes,
                                 interpret=interpret, k_scales=k_scales, v_scales=v_scales,
                                 skip=skip, out=out)
    if chunks:  # at most num_tokens // min_chunk long chunks: one overlapping item each
        out = paged_prefill_mgpu(q, k_pages, v_pages, layer, page_tables, seq_lens,
                                 query_start, long, out, sm_scale=sm_scale,
                                 max_items=-(-num_tokens // TILE_Q) + num_tokens // min_chunk,
                                 interpret=interpret)
    return out.astype(q.dtype)


ragged_paged_attention_flash.takes_new_kv = True  # the model passes k_new, v_new
