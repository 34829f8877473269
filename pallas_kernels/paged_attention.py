"""Ragged paged attention: decode tokens and prefill chunks of many sequences in one call.

Layout (shared with the engine's KV cache):
  k_pages, v_pages: [num_layers, num_pages, page_size, num_kv_heads, head_dim]
  q:                [num_tokens, num_q_heads, head_dim], tokens of sequence s are
                    q[query_start[s]:query_start[s+1]] and are the LAST tokens of its context,
                    so query token i of s sits at position seq_lens[s] - q_len(s) + i.
  page_tables:      [num_seqs, pages_per_seq] int32, page ids of each sequence in order.
Tokens at or past query_start[num_seqs] are padding: their output rows are zero.
The K/V of this step's tokens must already be written into the pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite, so that fully masked blocks never produce inf - inf.
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_positions(query_start, seq_lens, num_tokens):
    """Sequence index and absolute position of each query token; -1 positions are padding."""
    num_seqs = seq_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start[1:], t, side="right").astype(jnp.int32)
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    pos = seq_lens[seq] - (query_start[seq + 1] - t)
    return seq, jnp.where(valid, pos, -1)


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block"))
def ragged_paged_attention_reference(
    q,  # [T, H, D]
    k_pages,  # [L, N, page_size, KVH, D]
    v_pages,  # [L, N, page_size, KVH, D]
    layer,  # int32 scalar
    page_tables,  # [S, P] int32
    seq_lens,  # [S] int32
    query_start,  # [S + 1] int32
    *,
    sm_scale: float,
    pages_per_block: int = 8,
):
    """Plain-jnp ragged paged attention with an online softmax over blocks of pages."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    seq, pos = token_positions(query_start, seq_lens, num_tokens)

    pages_per_seq = page_tables.shape[1]
    ppb = min(pages_per_block, pages_per_seq)
    padded = -(-pages_per_seq // ppb) * ppb
    tables = jnp.pad(page_tables, ((0, 0), (0, padded - pages_per_seq)))[seq]  # [T, padded]
    block_len = ppb * page_size
    num_blocks = jnp.minimum((jnp.max(pos) + block_len) // block_len, padded // ppb)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale

    def body(j, carry):
        m, l, acc = carry  # [T, KVH, G], [T, KVH, G], [T, KVH, G, D]
        pages = jax.lax.dynamic_slice_in_dim(tables, j * ppb, ppb, axis=1)  # [T, ppb]
        k = k_pages[layer, pages].reshape(num_tokens, block_len, num_kv_heads, head_dim)
        v = v_pages[layer, pages].reshape(num_tokens, block_len, num_kv_heads, head_dim)
        s = jnp.einsum("tkgd,tskd->tkgs", qg, k.astype(jnp.float32))
        kpos = j * block_len + jnp.arange(block_len)
        mask = (kpos[None, :] <= pos[:, None])[:, None, None, :]  # [T, 1, 1, S]
        s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("tkgs,tskd->tkgd", p, v.astype(jnp.float32))
        return m_new, l, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), DEFAULT_MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
