"""Causal flash attention for prefill over a packed batch of variable-length sequences.

Layout:
  q:          [num_tokens, num_q_heads, head_dim]
  k, v:       [num_tokens, num_kv_heads, head_dim]; num_q_heads is a multiple of num_kv_heads
              (grouped-query attention: query head h reads KV head h // group).
  cu_seqlens: [num_seqs + 1] int32, cumulative lengths with cu_seqlens[0] == 0; sequence b is
              rows cu_seqlens[b]:cu_seqlens[b + 1]. Row t attends the rows s <= t of its own
              sequence. Rows at or past cu_seqlens[num_seqs] are padding: their output is zero.

Kernel (Pallas, Triton backend): grid (num_q_heads, num_q_blocks); program (h, i) takes query
block num_q_blocks - 1 - i (the longest rows start first) of head h, a [block_q, head_dim]
tile, and walks key blocks of block_k rows with an online softmax in float32 (exp2 domain).
Programs next to each other are the heads of one query block, so a group's heads share K/V
in L2. The key range is dynamic: from the block of the first row's sequence start to the
last valid row; blocks wholly inside every row's window run without a mask, and only the
blocks at the sequence start and on the diagonal are masked, so blocks above the diagonal or
in other sequences are never loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.online_softmax import DEFAULT_MASK_VALUE, is_pow2, load, softmax_step

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tiling: query rows and key rows per step, Triton warps and pipeline stages."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def check(self):
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not is_pow2(v) or v < 16:
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two >= 16")
        if not is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"BlockSizes.num_warps={self.num_warps} must be a power of two "
                             "<= 32")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be an int >= 1")


def _flash_kernel(
    kv_start_ref,  # [T] int32: first row of each row's sequence; T for padding rows
    cu_ref,  # [B + 1] int32
    q_ref,  # [T, H, D]
    k_ref,  # [T, KVH, D]
    v_ref,  # [T, KVH, D]
    o_ref,  # [T, H, D]
    *,
    block_q: int,
    block_k: int,
    group: int,
    num_q_blocks: int,
    scale: float,
):
    num_tokens, _, head_dim = q_ref.shape
    head = pl.program_id(0)
    kv_head = lax.div(head, jnp.int32(group))
    t0 = (num_q_blocks - 1 - pl.program_id(1)) * block_q
    rows = t0 + lax.iota(jnp.int32, block_q)
    ragged = num_tokens % block_q != 0  # static: only then can a tile overrun the arrays
    in_range = (rows < num_tokens) if ragged else None
    row_mask = None if in_range is None else in_range[:, None]
    q = load(q_ref.at[pl.ds(t0, block_q), head, :], row_mask, 0.0)
    row_start = load(kv_start_ref.at[pl.ds(t0, block_q)], in_range, num_tokens)

    num_valid = cu_ref[cu_ref.shape[0] - 1]
    kv_hi = jnp.minimum(t0 + block_q, num_valid)  # keys needed: [first_start, kv_hi)
    first_start = kv_start_ref[t0]
    last_start = kv_start_ref[jnp.clip(kv_hi - 1, 0, num_tokens - 1)]

    def body(j, carry, masked: bool):
        kpos = j * block_k + lax.iota(jnp.int32, block_k)
        kv_mask = (kpos < kv_hi)[:, None] if masked else None
        k = load(k_ref.at[pl.ds(j * block_k, block_k), kv_head, :], kv_mask, 0.0)
        v = load(v_ref.at[pl.ds(j * block_k, block_k), kv_head, :], kv_mask, 0.0)
        mask = None
        if masked:
            mask = (kpos[None, :] >= row_start[:, None]) & (kpos[None, :] <= rows[:, None])
        return softmax_step(q, k, v, carry, mask, scale)

    lo = lax.div(first_start, jnp.int32(block_k))
    hi = lax.div(jnp.maximum(kv_hi, 0) + (block_k - 1), jnp.int32(block_k))
    # [u0, u1): blocks inside every valid row's window [row_start, row], so no mask.
    u0 = jnp.clip(lax.div(last_start + (block_k - 1), jnp.int32(block_k)), lo, hi)
    u1 = jnp.clip(lax.div(t0 + 1, jnp.int32(block_k)), u0, hi)
    carry = (jnp.full((block_q,), DEFAULT_MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, head_dim), jnp.float32))
    carry = lax.fori_loop(lo, u0, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(u0, u1, functools.partial(body, masked=False), carry)
    _, denom, acc = lax.fori_loop(u1, hi, functools.partial(body, masked=True), carry)

    # Padding rows (row_start > row) may have picked up keys in unmasked blocks: zero them
    # with a select, so that whatever they hold (even NaN) never reaches the output.
    keep = (denom > 0) & (row_start <= rows)
    inv = 1.0 / jnp.where(keep, denom, 1.0)
    o = jnp.where(keep[:, None], acc * inv[:, None], 0.0).astype(o_ref.dtype)
    if row_mask is None:
        plgpu.store(o_ref.at[pl.ds(t0, block_q), head, :], o)
    else:
        plgpu.store(o_ref.at[pl.ds(t0, block_q), head, :], o, mask=row_mask)


def _flash_call(q, k, v, kv_start, cu_seqlens, *, block_sizes: BlockSizes, scale: float,
                interpret: bool):
    num_tokens, num_heads, _ = q.shape
    num_q_blocks = -(-num_tokens // block_sizes.block_q)
    kernel = functools.partial(
        _flash_kernel, block_q=block_sizes.block_q, block_k=block_sizes.block_k,
        group=num_heads // k.shape[1], num_q_blocks=num_q_blocks, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(num_heads, num_q_blocks),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(kv_start, cu_seqlens, q, k, v)


def check_packed_inputs(q, k, v, cu_seqlens, *, dtypes, head_dims: str, head_dim_ok):
    """The packed-varlen contract's checks, shared by the flash kernels: ValueError naming
    the argument. dtypes: the allowed dtypes; head_dim_ok(d) with head_dims its words."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim]; got {q.shape=}")
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [num_tokens, num_kv_heads, head_dim]; got "
                         f"{k.shape=}, {v.shape=}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{q.dtype=} must be one of {names}")
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k rows and head_dim must match q; got {q.shape=}, {k.shape=}")
    if not head_dim_ok(head_dim):
        raise ValueError(f"{head_dim=} must be {head_dims}")
    if num_heads % k.shape[1]:
        raise ValueError(f"num_q_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({k.shape[1]})")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype != jnp.int32:
        raise ValueError(f"cu_seqlens must be int32 [num_seqs + 1]; got {cu_seqlens.shape=} "
                         f"{cu_seqlens.dtype=}")


def sequence_rows(cu_seqlens, num_tokens):
    """Sequence index of each row and whether the row is inside a sequence."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_seqlens[1:], t, side="right", method="compare_all")
    return seq.astype(jnp.int32), t < cu_seqlens[-1]


def first_key_rows(cu_seqlens, num_tokens):
    """[T] int32: the first row of each row's sequence (num_tokens for padding rows)."""
    seq, valid = sequence_rows(cu_seqlens, num_tokens)
    num_seqs = cu_seqlens.shape[0] - 1
    first = cu_seqlens[jnp.minimum(seq, num_seqs - 1)]
    return jnp.where(valid, first, num_tokens).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def flash_attention(
    q,  # [T, H, D]
    k,  # [T, KVH, D]
    v,  # [T, KVH, D]
    cu_seqlens,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
):
    """Causal varlen attention (Pallas); sm_scale defaults to head_dim ** -0.5."""
    check_packed_inputs(q, k, v, cu_seqlens, dtypes=(jnp.bfloat16, jnp.float16, jnp.float32),
                        head_dims="a power of two >= 16 (64 and 128 are tested)",
                        head_dim_ok=lambda d: is_pow2(d) and d >= 16)
    block_sizes.check()
    num_tokens, _, head_dim = q.shape
    scale = (head_dim**-0.5 if sm_scale is None else float(sm_scale)) * LOG2_E
    return _flash_call(q, k, v, first_key_rows(cu_seqlens, num_tokens), cu_seqlens,
                       block_sizes=block_sizes, scale=scale, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def flash_attention_reference(
    q,  # [T, H, D]
    k,  # [T, KVH, D]
    v,  # [T, KVH, D]
    cu_seqlens,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
):
    """Plain-jnp causal varlen attention with the kernel's mask value and output dtype."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    seq, valid = sequence_rows(cu_seqlens, num_tokens)
    t = jnp.arange(num_tokens)
    mask = (seq[:, None] == seq[None, :]) & (t[None, :] <= t[:, None]) & valid[:, None]
    qg = q.reshape(num_tokens, kv_heads, group, head_dim).astype(jnp.float32) * scale
    hi = lax.Precision.HIGHEST
    s = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32), precision=hi)
    s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
    p = jnp.where(mask, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
    denom = p.sum(axis=-1)  # [KVH, G, T]
    o = jnp.einsum("kgts,skd->tkgd", p, v.astype(jnp.float32), precision=hi)
    denom = denom.transpose(2, 0, 1)[..., None]  # [T, KVH, G, 1]
    o = jnp.where(denom > 0, o / jnp.maximum(denom, 1e-30), 0.0)
    return o.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
