"""Ragged paged attention: decode tokens and prefill chunks of many sequences in one call.

Layout (shared with the engine's KV cache):
  k_pages, v_pages: [num_layers, num_pages, page_size, num_kv_heads, head_dim]
  q:                [num_tokens, num_q_heads, head_dim], tokens of sequence s are
                    q[query_start[s]:query_start[s+1]] and are the LAST tokens of its context,
                    so query token i of s sits at position seq_lens[s] - q_len(s) + i.
  page_tables:      [num_seqs, pages_per_seq] int32, page ids of each sequence in order.
  k_scales, v_scales: [num_layers, num_pages, page_size, num_kv_heads] float32, only for
                    int8 or float8_e4m3fn pages: the K/V vector of (token, head) is its page
                    entry times its scale (jaxserve/models/quant.py writes them).
Tokens at or past query_start[num_seqs] are padding: their output rows are zero.
The K/V of this step's tokens must already be written into the pages.
query_start[0] must be 0 and seq_lens[s] <= pages_per_seq * page_size.

Kernel (Pallas, Triton backend). A work item is a run of up to `block_q` query tokens of one
sequence; a program takes one work item and one KV head, so its q tile is the item's tokens
times the group's query heads, [block_q * group_pad, head_dim] (token-major rows), and every
K/V element it loads serves all query heads of the group. The program walks the sequence's
keys in blocks of `block_kv` tokens, only up to the item's last position (a dynamic loop
bound): the page of each key comes from the page table (a gather), keys and values are
gathered across pages, and an online softmax in float32 (exp2 domain) accumulates. Blocks
wholly below the item's first position run without masks; only the diagonal/tail blocks
mask, and their K/V loads are masked too, so nothing past a sequence's length is read.

Two launches share the kernel body:
  decode phase:  every sequence with 1..block_q_decode query tokens is one item; grid
                 (num_seqs, kv_heads, num_kv_splits). With splits > 1 (flash decoding, for
                 buckets of few sequences, or few filled, with long contexts) each
                 program takes a slice of the key blocks and writes float32 partials
                 that a second small kernel merges. How many of the splits run is decided
                 on device from the rows that hold a decode (`BlockSizes.decode_programs`);
                 the programs of the others exit at once and the merge skips them.
  prefill phase: longer chunks are cut into items of block_q tokens (a prefix sum over the
                 chunks maps program id -> (sequence, query block)); grid
                 (max_items, kv_heads). Neighbouring programs are neighbouring query blocks
                 of one sequence, so they share its history in L2.
The output starts as zeros, so padding rows and sequences without tokens stay zero.
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

from pallas_kernels import cpu_decode_attention
from pallas_kernels.online_softmax import DEFAULT_MASK_VALUE, is_pow2, load, softmax_step

LOG2_E = math.log2(math.e)
# Auto split-K aims at 2048 programs (sequence rows x KV heads x splits) for the bucket.
# The bucket's sequence rows are static, how many hold a sequence is not, so one choice
# serves a full bucket and a nearly empty one. One H200, 32 layers of the 8B shape's
# attention (8 KV heads, max_model_len 2048, pages of 16; scripts/bench_split_k.py), with
# the earlier 4224 target's 16 / 4 splits in brackets: bucket of 32 rows, 8 splits: 32
# sequences at 0.5k context 0.99 ms (1.31), 8 at 1.8k 0.74 ms (0.85), one at 0.5k 0.30 ms
# (0.33), one at 1.8k 0.43 ms (0.42); bucket of 128 rows, 2 splits: 128 at 0.5k 2.63 ms
# (2.92), at 1.8k 7.47 ms (7.79).
_TARGET_PROGRAMS = 2048
_MAX_KV_SPLITS = 16
# The splits that run are chosen again on device from the rows that hold a decode: as many
# as bring filled rows x KV heads x splits near `BlockSizes.decode_programs`, at least 2 and
# at most the static count. The static count suits a nearly empty bucket; a full one wants
# fewer. One H200, same attention (scripts/bench_split_k.py, 2026-12-02): a bucket of 32
# rows holding 32 sequences at 0.5k context 0.82-0.84 ms with 2 of its 8 splits run,
# 0.99-1.00 ms with all 8; at 1.8k 2.07-2.09 against 2.19; 16 sequences at 1.8k 1.20 ms
# (4 run) against 1.25; 8 or one sequence: all 8 run, as before. One split run is not
# offered: in the 8B engine's step at B=128 (bucket of 128 rows, 2 splits) it made the
# decode kernel 9% slower (2.69 against 2.46 ms, three runs), although this benchmark's
# random pages found it faster.
_DECODE_PROGRAMS = 512
# Rows of the work-item table: sequence, first query row, query tokens, keys needed.
_SEQ, _T0, _N, _KV_END = range(4)


def unsupported_head_dim(head_dim: int) -> str | None:
    """Why the Pallas attention kernels cannot take this head_dim, or None: their Triton dot
    tiles need a power of two of at least 16."""
    if not is_pow2(head_dim) or head_dim < 16:
        return f"need head_dim a power of two >= 16 (this model's is {head_dim})"
    return None


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Static tiling; None fields are derived from the shapes by `resolve`.

    A program's q tile has block_q * group_pad rows (group_pad: query heads per KV head,
    rounded up to a power of two), which must be a power of two >= 16 (Triton dot tiles).
    """

    block_q: int | None = None  # prefill-phase tokens per item; None: 128 rows
    block_q_decode: int | None = None  # decode-phase tokens per sequence; None: 16 rows
    block_kv: int = 64  # keys per loop step, prefill phase
    # keys per loop step, decode phase; None: 64 for 16-bit pages, 128 for 8-bit ones (the
    # same bytes per load). One H200, 32 query and 8 KV heads, 32 sequences at 8k context
    # (scripts/bench_kv_quant.py, 2026-12-02): int8 pages took 1.22x the bf16 pages' time
    # with 64 keys, 0.79x with 128; bf16 pages gain nothing from 128 (1.0x), nor 8-bit
    # pages from 256.
    block_kv_decode: int | None = None
    num_kv_splits: int | None = None  # decode-phase split-K; None: from the batch size
    # decode-phase splits that run, chosen on device: filled rows x KV heads x splits near
    # this, at least 2, at most num_kv_splits; None: all num_kv_splits run
    decode_programs: int | None = _DECODE_PROGRAMS
    num_warps: int = 8
    num_stages: int = 2
    num_warps_decode: int = 4
    num_stages_decode: int = 2

    def resolve(self, *, group: int, num_seqs: int, kv_heads: int, max_kv_len: int,
                kv_bytes: int = 2):
        """Concrete sizes for these shapes (kv_bytes: bytes per page element); raises
        ValueError naming a bad field."""
        self._check_fixed()
        bkv_decode = self.block_kv_decode
        if bkv_decode is None:
            bkv_decode = 128 if kv_bytes == 1 else 64
        group_pad = _next_pow2(group)
        bq_decode = self.block_q_decode
        if bq_decode is None:
            bq_decode = max(1, 16 // group_pad)
        bq = max(1, 128 // group_pad) if self.block_q is None else self.block_q
        splits = self.num_kv_splits
        if splits is None:
            want = max(1, _TARGET_PROGRAMS // max(1, num_seqs * kv_heads))
            useful = max(1, -(-max_kv_len // bkv_decode))
            splits = min(_MAX_KV_SPLITS, 1 << (min(want, useful).bit_length() - 1))
        for name, v in (("block_q", bq), ("block_q_decode", bq_decode)):
            if not is_pow2(v) or v * group_pad < 16:
                raise ValueError(
                    f"BlockSizes.{name}={v} must be a power of two with {name} * group_pad "
                    f">= 16 ({group_pad=}: query heads per KV head, rounded up to 2^k)")
        if not is_pow2(splits) or splits > 64:
            raise ValueError(f"BlockSizes.num_kv_splits={splits} must be a power of two <= 64")
        return dataclasses.replace(self, block_q=bq, block_q_decode=bq_decode,
                                   block_kv_decode=bkv_decode, num_kv_splits=splits)

    def _check_fixed(self):
        for name in ("block_kv", "block_kv_decode"):
            v = getattr(self, name)
            if name == "block_kv_decode" and v is None:
                continue
            if not is_pow2(v) or v < 16:
                none = " (or None)" if name == "block_kv_decode" else ""
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two >= 16{none}")
        for name in ("num_warps", "num_warps_decode"):
            v = getattr(self, name)
            if not is_pow2(v) or v > 32:
                raise ValueError(f"BlockSizes.{name}={v} must be a power of two <= 32")
        for name in ("num_stages", "num_stages_decode"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSizes.{name}={v} must be an int >= 1")
        v = self.decode_programs
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"BlockSizes.decode_programs={v} must be None or an int >= 1")


def token_positions(query_start, seq_lens, num_tokens):
    """Sequence index and absolute position of each query token; -1 positions are padding."""
    num_seqs = seq_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start[1:], t, side="right").astype(jnp.int32)
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    pos = seq_lens[seq] - (query_start[seq + 1] - t)
    return seq, jnp.where(valid, pos, -1)


def _div(x, c: int):
    """x // c for non-negative int32 x and a static c > 0."""
    if is_pow2(c):
        return lax.shift_right_logical(x, jnp.int32(c.bit_length() - 1))
    return lax.div(x, jnp.int32(c))


def _rem(x, c: int):
    """x % c for non-negative int32 x and a static c > 0."""
    if is_pow2(c):
        return x & jnp.int32(c - 1)
    return lax.rem(x, jnp.int32(c))


def _cdiv(x, c: int):
    return _div(x + (c - 1), c)


def _tile_rows(t0, n, kv_head, *, block_q: int, group: int):
    """Per q-tile row (token-major, r = i * group_pad + j): token i, q row, q head, valid."""
    group_pad = _next_pow2(group)
    r = lax.iota(jnp.int32, block_q * group_pad)
    tok, head = _div(r, group_pad), _rem(r, group_pad)
    ok = tok < n
    if group != group_pad:
        ok = ok & (head < group)
    return tok, t0 + tok, kv_head * group + head, ok


def _store_rows(o_ref, acc, denom, t_idx, h_idx, ok):
    """Normalizes acc [R, D] by denom [R] (rows without keys -> 0) into o_ref[t_idx, h_idx]."""
    d = lax.iota(jnp.int32, acc.shape[1])
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    o = (acc * inv[:, None]).astype(o_ref.dtype)
    plgpu.store(o_ref.at[t_idx[:, None], h_idx[:, None], d[None, :]], o, mask=ok[:, None])


def _paged_kernel(
    items_ref,  # [4, W] int32: sequence, first query row, query tokens, kv_end
    layer_ref,  # [1] int32
    active_ref,  # [1] int32: how many of the num_splits run
    page_tables_ref,  # [S, P] int32
    q_ref,  # [T, H, D]
    k_pages_ref,  # [L, N, page_size, KVH, D]
    v_pages_ref,  # [L, N, page_size, KVH, D]
    *refs,  # quantized: k_scales, v_scales [L, N, page_size, KVH] f32; then the outputs:
    #         splits == 1: out_in (aliased), out [T, H, D]
    #         splits > 1:  o [K, W, KVH, R, D], m [K, W, KVH, R], l [K, W, KVH, R] f32
    block_q: int,
    block_kv: int,
    group: int,
    num_splits: int,
    scale: float,
    quantized: bool,
):
    (k_scale_ref, v_scale_ref), out_refs = (refs[:2], refs[2:]) if quantized else \
        ((None, None), refs)
    w, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = items_ref[_N, w]
    active = active_ref[0]

    @pl.when((n > 0) & (split < active))
    def _():
        seq, t0, kv_end = items_ref[_SEQ, w], items_ref[_T0, w], items_ref[_KV_END, w]
        layer = layer_ref[0]
        num_pages, page_size = k_pages_ref.shape[1], k_pages_ref.shape[2]
        head_dim = q_ref.shape[2]
        d = lax.iota(jnp.int32, head_dim)
        tok, t_idx, h_idx, ok = _tile_rows(t0, n, kv_head, block_q=block_q, group=group)
        q = load(q_ref.at[t_idx[:, None], h_idx[:, None], d[None, :]], ok[:, None], 0.0)
        if k_pages_ref.dtype == jnp.float8_e4m3fn and q.dtype.itemsize == 2:
            # fp8 pages are converted to float16 (exact for e4m3), which measured faster than
            # bfloat16: one H200, 32 sequences at 8k, 0.79x against 1.02x the bf16 pages'
            # time (1.32x with 64 keys a step). A 16-bit q joins them, clipped into
            # float16's range.
            q = jnp.clip(q, -65504.0, 65504.0).astype(jnp.float16)
        row_pos = kv_end - n + tok  # absolute position of each row's token

        def body(j, carry, masked: bool):
            kpos = j * block_kv + lax.iota(jnp.int32, block_kv)
            kmask = (kpos < kv_end) if masked else None
            page = load(page_tables_ref.at[seq, _div(kpos, page_size)], kmask, 0)
            page = jnp.clip(page, 0, num_pages - 1)
            idx = (layer, page[:, None], _rem(kpos, page_size)[:, None], kv_head, d[None, :])
            kv_mask = None if kmask is None else kmask[:, None]
            zero = 0 if k_pages_ref.dtype == jnp.int8 else 0.0
            k = load(k_pages_ref.at[idx], kv_mask, zero)  # [BK, D]
            v = load(v_pages_ref.at[idx], kv_mask, zero)
            mask = (kpos[None, :] <= row_pos[:, None]) if masked else None
            if not quantized:
                return softmax_step(q, k, v, carry, mask, scale)
            at = (layer, page, _rem(kpos, page_size), kv_head)  # one scale per key
            k_scale = load(k_scale_ref.at[at], kmask, 0.0)  # [BK]
            v_scale = load(v_scale_ref.at[at], kmask, 0.0)
            return softmax_step(q, k.astype(q.dtype), v.astype(q.dtype), carry, mask, scale,
                                k_scale, v_scale)

        num_blocks = _cdiv(jnp.maximum(kv_end, 0), block_kv)
        per_split = num_blocks if num_splits == 1 else lax.div(num_blocks + active - 1, active)
        lo = split * per_split
        hi = jnp.minimum(lo + per_split, num_blocks)
        # Blocks before `mid` end at or before the first query position: no mask needed.
        mid = jnp.clip(_div(jnp.maximum(kv_end - n + 1, 0), block_kv), lo, hi)
        rows = q.shape[0]
        carry = (jnp.full((rows,), DEFAULT_MASK_VALUE, jnp.float32),
                 jnp.zeros((rows,), jnp.float32),
                 jnp.zeros((rows, head_dim), jnp.float32))
        carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
        m, denom, acc = lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)

        if num_splits == 1:
            _, o_ref = out_refs
            _store_rows(o_ref, acc, denom, t_idx, h_idx, ok)
        else:
            o_part_ref, m_part_ref, l_part_ref = out_refs
            plgpu.store(o_part_ref.at[split, w, kv_head], acc, mask=ok[:, None])
            plgpu.store(m_part_ref.at[split, w, kv_head], m, mask=ok)
            plgpu.store(l_part_ref.at[split, w, kv_head], denom, mask=ok)


def _combine_kernel(
    items_ref,  # [4, W] int32
    active_ref,  # [1] int32: how many splits ran
    o_part_ref,  # [K, W, KVH, R, D] float32
    m_part_ref,  # [K, W, KVH, R] float32
    l_part_ref,  # [K, W, KVH, R] float32
    out_in_ref,  # [T, H, D], aliased with o_ref
    o_ref,  # [T, H, D]
    *,
    block_q: int,
    group: int,
):
    """Merges the split-K partials of one (sequence, KV head) into its output rows; the
    partials of splits that did not run are never read."""
    del out_in_ref
    w, kv_head = pl.program_id(0), pl.program_id(1)
    n = items_ref[_N, w]

    @pl.when(n > 0)
    def _():
        t0 = items_ref[_T0, w]
        _, t_idx, h_idx, ok = _tile_rows(t0, n, kv_head, block_q=block_q, group=group)
        ran = lax.iota(jnp.int32, o_part_ref.shape[0]) < active_ref[0]
        ok2 = ran[:, None] & ok[None, :]  # [K, R]
        m = load(m_part_ref.at[:, w, kv_head], ok2, DEFAULT_MASK_VALUE)
        denom = load(l_part_ref.at[:, w, kv_head], ok2, 0.0)
        o = load(o_part_ref.at[:, w, kv_head], ok2[:, :, None], 0.0)  # [K, R, D]
        m_all = m.max(axis=0)
        alpha = jnp.exp2(m - m_all[None, :])
        l_all = (alpha * denom).sum(axis=0)
        acc = (alpha[:, :, None] * o).sum(axis=0)
        _store_rows(o_ref, acc, l_all, t_idx, h_idx, ok)


def _paged_phase(q, k_pages, v_pages, scales, layer, active, page_tables, items, out, *,
                 block_q, block_kv, num_splits, num_warps, num_stages, scale, interpret, name):
    """One launch over work items `items` [4, W]; writes their rows into `out` (aliased).
    scales: () or (k_scales, v_scales) of quantized pages; layer, active: [1] int32, the
    layer and how many of the num_splits run."""
    num_items = items.shape[1]
    _, _, _, kv_heads, head_dim = k_pages.shape
    group = q.shape[1] // kv_heads
    kernel = functools.partial(_paged_kernel, block_q=block_q, block_kv=block_kv, group=group,
                               num_splits=num_splits, scale=scale, quantized=bool(scales))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    grid = (num_items, kv_heads, num_splits)
    args = (items, layer, active, page_tables, q, k_pages, v_pages, *scales)
    out_struct = jax.ShapeDtypeStruct(out.shape, out.dtype)
    if num_splits == 1:
        return pl.pallas_call(
            kernel, grid=grid, out_shape=out_struct, input_output_aliases={len(args): 0},
            compiler_params=params, interpret=interpret, name=name,
        )(*args, out)
    part = (num_splits, num_items, kv_heads, block_q * _next_pow2(group))
    parts = pl.pallas_call(
        kernel, grid=grid,
        out_shape=(jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)),
        compiler_params=params, interpret=interpret, name=f"{name}_split",
    )(*args)
    combine = functools.partial(_combine_kernel, block_q=block_q, group=group)
    return pl.pallas_call(
        combine, grid=(num_items, kv_heads), out_shape=out_struct, input_output_aliases={5: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name=f"{name}_combine",
    )(items, active, *parts, out)


def decode_splits(decode_tokens, kv_heads: int, num_splits: int, decode_programs):
    """How many of the decode launch's `num_splits` run, an int32 scalar computed on device:
    filled rows (decode_tokens [S] > 0) x kv_heads x splits near `decode_programs`, at least
    2 and at most num_splits; all of them when decode_programs is None."""
    if decode_programs is None or num_splits <= 2:
        return jnp.int32(num_splits)
    filled = jnp.maximum(jnp.sum(decode_tokens > 0, dtype=jnp.int32), 1)
    return jnp.clip(decode_programs // (filled * kv_heads), 2, num_splits).astype(jnp.int32)


def _work_items(seq_lens, query_start, num_prefill_items, skip, *, block_q_decode, block_q):
    """Work-item tables [4, W] (sequence, first row, tokens, kv_end) for both phases; the
    sequences where `skip` (None or [S] bool) is true get none."""
    num_seqs = seq_lens.shape[0]
    starts = query_start[:-1]
    q_len = query_start[1:] - starts
    if skip is not None:
        q_len = jnp.where(skip, 0, q_len)
    small = q_len <= block_q_decode
    decode = jnp.stack([jnp.arange(num_seqs, dtype=jnp.int32), starts,
                        jnp.where(small, q_len, 0), seq_lens])
    if not num_prefill_items:
        return decode, None
    blocks = jnp.where(small, 0, (q_len + block_q - 1) // block_q)
    ends = jnp.cumsum(blocks).astype(jnp.int32)
    w = jnp.arange(num_prefill_items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, w, side="right", method="compare_all").astype(jnp.int32)
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first = (w - (ends[seq] - blocks[seq])) * block_q  # first token of the item within seq
    n = jnp.where(valid, jnp.minimum(block_q, q_len[seq] - first), 0)
    kv_end = seq_lens[seq] - q_len[seq] + first + n
    return decode, jnp.stack([seq, starts[seq] + first, n, kv_end])


def _check_inputs(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start,
                  k_scales=None, v_scales=None):
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim]; got {q.shape=}")
    if k_pages.ndim != 5:
        raise ValueError("k_pages must be [num_layers, num_pages, page_size, num_kv_heads, "
                         f"head_dim]; got {k_pages.shape=}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must match k_pages; got {v_pages.shape=}, {k_pages.shape=}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must share a dtype; got {k_pages.dtype=}, "
                         f"{v_pages.dtype=}")
    floats = (jnp.bfloat16, jnp.float16, jnp.float32)
    if q.dtype not in floats:
        raise ValueError(f"q dtype {q.dtype} must be bfloat16, float16 or float32")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales come together")
    if k_scales is None and k_pages.dtype not in floats:
        raise ValueError(f"k_pages dtype {k_pages.dtype} must be bfloat16, float16 or float32 "
                         "(int8 and float8_e4m3fn pages need k_scales and v_scales)")
    if k_scales is not None:
        if k_pages.dtype not in (jnp.int8, jnp.float8_e4m3fn):
            raise ValueError(f"k_pages dtype {k_pages.dtype} with scales must be int8 or "
                             "float8_e4m3fn")
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != k_pages.shape[:4] or s.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 {k_pages.shape[:4]}; got "
                                 f"{s.shape=} {s.dtype=}")
    _, num_heads, head_dim = q.shape
    _, _, _, kv_heads, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and k_pages ({kv_head_dim}) differ")
    if unsupported_head_dim(head_dim):
        raise ValueError(f"{head_dim=} must be a power of two >= 16 (64 and 128 are tested)")
    if num_heads % kv_heads:
        raise ValueError(f"num_q_heads ({num_heads}) must be a multiple of {kv_heads=}")
    if page_tables.ndim != 2 or page_tables.dtype != jnp.int32:
        raise ValueError(f"page_tables must be int32 [num_seqs, pages_per_seq]; got "
                         f"{page_tables.shape=} {page_tables.dtype=}")
    num_seqs = page_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != jnp.int32:
        raise ValueError(f"seq_lens must be int32 [{num_seqs}]; got {seq_lens.shape=} "
                         f"{seq_lens.dtype=}")
    if query_start.shape != (num_seqs + 1,) or query_start.dtype != jnp.int32:
        raise ValueError(f"query_start must be int32 [{num_seqs + 1}]; got "
                         f"{query_start.shape=} {query_start.dtype=}")
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar; got {layer=}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret",
                                             "decode_only"))
def ragged_paged_attention(
    q,  # [T, H, D]
    k_pages,  # [L, N, page_size, KVH, D]
    v_pages,  # [L, N, page_size, KVH, D]
    layer,  # int32 scalar
    page_tables,  # [S, P] int32
    seq_lens,  # [S] int32
    query_start,  # [S + 1] int32
    *,
    sm_scale: float,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
    k_scales=None,  # [L, N, page_size, KVH] float32, for int8/fp8 pages
    v_scales=None,
    decode_only: bool = False,
    skip=None,  # [S] bool: sequences left out (their rows keep `out`'s)
    out=None,  # [T, H, D]: the rows skipped sequences and padding keep; None: zeros
):
    """Pallas ragged paged attention; same contract as `ragged_paged_attention_reference`.

    q is cast to the cache dtype for the kernel (float32 accumulation); the output has q's
    dtype. Quantized pages are instead converted as they load: to q's dtype, except fp8
    pages with a 16-bit q, which (with q) become float16.
    decode_only: the caller promises that no sequence has more than one query token (a
    multi-step decode program), so the prefill phase is not launched.
    skip: sequences another kernel attends (flash_prefill.py gives it fresh prompts); their
    output rows, and the padding rows past query_start[-1], are `out`'s (zero without it):
    the kernels write only the rows of the sequences they attend, into `out`'s buffer.
    """
    _check_inputs(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start,
                  k_scales, v_scales)
    num_tokens, num_heads, _ = q.shape
    _, _, page_size, kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_tables.shape
    bs = block_sizes.resolve(group=num_heads // kv_heads, num_seqs=num_seqs, kv_heads=kv_heads,
                             max_kv_len=pages_per_seq * page_size,
                             kv_bytes=k_pages.dtype.itemsize)
    # A chunk longer than block_q_decode has at least block_q_decode + 1 tokens.
    num_prefill_items = 0
    if num_tokens > bs.block_q_decode and not decode_only:
        num_prefill_items = (-(-num_tokens // bs.block_q)
                             + min(num_seqs, num_tokens // (bs.block_q_decode + 1)))
    decode_items, prefill_items = _work_items(
        seq_lens, query_start, num_prefill_items, skip,
        block_q_decode=bs.block_q_decode, block_q=bs.block_q)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    active = decode_splits(decode_items[_N], kv_heads, bs.num_kv_splits, bs.decode_programs)
    scales = () if k_scales is None else (k_scales, v_scales)
    q_in = q if scales else q.astype(k_pages.dtype)
    phase = functools.partial(_paged_phase, q_in, k_pages, v_pages, scales, layer,
                              page_tables=page_tables, scale=float(sm_scale) * LOG2_E,
                              interpret=interpret)
    if out is None:
        out = jnp.zeros_like(q_in)
    elif out.shape != q.shape:
        raise ValueError(f"out must have q's shape {q.shape}; got {out.shape}")
    out = phase(active.reshape(1), items=decode_items, out=out.astype(q_in.dtype),
                block_q=bs.block_q_decode, block_kv=bs.block_kv_decode,
                num_splits=bs.num_kv_splits, num_warps=bs.num_warps_decode,
                num_stages=bs.num_stages_decode, name="ragged_paged_attention_decode")
    if prefill_items is not None:
        out = phase(jnp.ones((1,), jnp.int32), items=prefill_items, out=out,
                    block_q=bs.block_q, block_kv=bs.block_kv, num_splits=1,
                    num_warps=bs.num_warps, num_stages=bs.num_stages,
                    name="ragged_paged_attention_prefill")
    return out.astype(q.dtype)


FORMULATIONS = ("token", "sequence", "window")
FEW_TOKENS = 4  # the "token" formulation's calls of at most this many tokens: head_keys
SMALL_WINDOW = 8  # the "window" formulation's window for decodes and short chunks


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block",
                                             "decode_pages_per_block", "formulation", "window",
                                             "cpu_kernel"))
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
    decode_pages_per_block: int = 6,
    formulation: str | None = None,
    window: int = 64,
    k_scales=None,  # [L, N, page_size, KVH] float32, for int8/fp8 pages
    v_scales=None,
    k_new=None,  # [T, KVH, D]: this step's K/V rows, as written into the pages (optional)
    v_new=None,
    cpu_kernel: bool = False,
):
    """Plain-jnp ragged paged attention with an online softmax over blocks of pages.

    Three formulations of the same sums, chosen by the shapes (static):
    - token: each token gathers its own sequence's pages (up to FEW_TOKENS tokens: each KV
      head's slice of them, `head_keys`). Right for decode; for a prefill chunk it moves the
      chunk's K/V once per token.
    - sequence: each block of pages is gathered once per sequence and every token is scored
      against every sequence's block in one matmul, the other sequences' keys masked out.
      For a few sequences (<= 4) with several tokens each, off CPU.
    - window: a loop over the sequences, and over windows of `window` of each sequence's
      tokens, each scored against its own sequence's blocks only (nothing wasted but the
      window's padding). On CPU, for batches with several tokens per sequence (prefill
      chunks): the attention of 16 prompts of 128 tokens, in one step, took about 0.23 s
      against 1.05 s with per-token gathers. Off CPU it is not chosen: its nested loops
      of small steps suit a CPU, were not measured on a GPU, and GPUs run the Pallas
      kernel anyway.
    formulation forces one of them (None: chosen by the shapes). With `cpu_kernel` (the
    runner's runner.cpu_kernels, on a CPU that runs it) the token formulation over float32
    pages is pallas_kernels/cpu_decode_attention.py's kernel. The token formulation
    walks blocks of decode_pages_per_block pages (twice that for FEW_TOKENS tokens or
    fewer), the others blocks of pages_per_block.

    With k_new and v_new (this step's K/V rows) and unquantized pages, the window
    formulation takes a prefill chunk's own keys from those rows instead of the pages, and
    only its history (keys before the chunk) from the pages: the same keys, the chunk's read
    without gathering pages or copying them transposed, in windows and blocks of 128 or 256
    keys, so bigger matmuls (`_rows_windows`).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    num_seqs = page_tables.shape[0]
    if formulation is None:
        chunks = num_tokens >= 4 * num_seqs  # several tokens per sequence on average
        formulation = "token" if not chunks else "window" if jax.default_backend() == "cpu" \
            else "sequence" if num_seqs <= 4 else "token"
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS} (got {formulation!r})")
    if cpu_kernel and formulation == "token" and k_scales is None \
            and cpu_decode_attention.takes(q, k_pages):
        seq, pos = token_positions(query_start, seq_lens, num_tokens)
        return cpu_decode_attention.cpu_decode_attention(  # float32 q and pages (takes)
            q, k_pages, v_pages, layer, page_tables[seq], pos, sm_scale=sm_scale)
    pages_per_seq = page_tables.shape[1]
    few = formulation == "token" and num_tokens <= FEW_TOKENS
    if formulation == "token":
        # Blocks whose K/V for all the tokens fit in 2 CPU cores' L2 caches: for 16 decodes
        # of the demo, 6 pages a block take 0.8x the time of 8 at 150-250 tokens, the same at
        # 400-1000. For a few tokens twice the pages: fewer steps, each mostly fixed cost.
        pages_per_block = decode_pages_per_block * (2 if few else 1)
    ppb = min(pages_per_block, pages_per_seq)
    padded = -(-pages_per_seq // ppb) * ppb
    tables = jnp.pad(page_tables, ((0, 0), (0, padded - pages_per_seq)))
    block_len = ppb * page_size
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale

    # The pages as rows of [L * N, page_size * KVH * D]: a block's gather takes whole rows,
    # each one contiguous run, which XLA's CPU backend copies as they lie; indexed by
    # (layer, page) in the 5-d array it computed every element's index.
    first_row = layer * k_pages.shape[1]

    def keys(pages):
        """K, V [..., block_len, KVH, D] float32 of pages [..., ppb], dequantized."""
        def gather(a):  # [L, N, page_size, KVH, ...] -> [..., block_len, KVH, ...]
            rows = a.reshape(-1, math.prod(a.shape[2:]))[first_row + pages]
            return rows.reshape(*pages.shape[:-1], block_len, *a.shape[3:])

        k = gather(k_pages).astype(jnp.float32)
        v = gather(v_pages).astype(jnp.float32)
        if k_scales is not None:  # quantized pages: one scale per (token, KV head)
            k = k * gather(k_scales)[..., None]
            v = v * gather(v_scales)[..., None]
        return k, v

    def head_keys(pages):
        """K, V [T, KVH, block_len, D] float32 of pages [T, ppb], dequantized: each (token,
        KV head) gathers its head's [page_size, D] slice of each page. For a few tokens this
        costs 0.7x the whole pages' gather and its products laid out by key (1-4 decodes on
        2 CPU cores); for 16 it costs 1.0-1.3x (scripts/bench_cpu_attention.py)."""
        rows = (first_row + pages)[:, None, :]
        heads = jnp.arange(num_kv_heads)[None, :, None]

        def gather(a):  # [L, N, page_size, KVH, ...] -> [T, KVH, block_len, ...]
            part = a.reshape(-1, *a.shape[2:])[rows, :, heads]  # [T, KVH, ppb, page, ...]
            return part.reshape(num_tokens, num_kv_heads, block_len, *a.shape[4:])

        k = gather(k_pages).astype(jnp.float32)
        v = gather(v_pages).astype(jnp.float32)
        if k_scales is not None:
            k = k * gather(k_scales)[..., None]
            v = v * gather(v_scales)[..., None]
        return k, v

    if formulation == "window":
        from_rows, rows_window = None, 0
        if k_new is not None and k_scales is None:
            small = min(ROWS_WINDOW, num_tokens)
            big = 2 * small if num_tokens > 2 * small else small  # for chunks of more
            rows_window = big
            # head-major copies, once per call: a block is then one slice per KV head
            heads_first = lambda a: jnp.pad(jnp.moveaxis(a, 1, 0).astype(jnp.float32),
                                            ((0, 0), (0, big)) + ((0, 0),) * (a.ndim - 2))
            from_rows = functools.partial(
                _chunk_from_rows, heads_first(qg), heads_first(k_new), heads_first(v_new),
                keys, tables, seq_lens, small=small, big=big, ppb=ppb, block_len=block_len)
        out = _by_windows(qg, keys, tables, seq_lens, query_start, ppb=ppb,
                          block_len=block_len, window=min(window, num_tokens),
                          from_rows=from_rows, pad=rows_window)
        return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)

    seq, pos = token_positions(query_start, seq_lens, num_tokens)
    by_seq = formulation == "sequence"
    if not by_seq:
        tables = tables[seq]  # [T, padded]
    owner = seq[:, None] == jnp.arange(num_seqs)[None, :]  # [T, S]
    num_blocks = jnp.minimum((jnp.max(pos) + block_len) // block_len, padded // ppb)

    def body(j, carry):
        pages = jax.lax.dynamic_slice_in_dim(tables, j * ppb, ppb, axis=1)
        causal = j * block_len + jnp.arange(block_len)[None, :] <= pos[:, None]  # [T, K]
        if few:  # K, V [T, KVH, K, D]: scores and values summed in place, as below
            k, v = head_keys(pages)
            s = jnp.sum(qg[:, :, :, None, :] * k[:, :, None], axis=-1)  # [T, KVH, G, K]
            return _online_block(carry, s, causal[:, None, None, :],
                                 lambda p: jnp.sum(p[..., None] * v[:, :, None], axis=3))
        k, v = keys(pages)
        if by_seq:  # pages [S, ppb]: keys of every sequence's block
            k = k.reshape(num_seqs * block_len, num_kv_heads, head_dim)
            v = v.reshape(num_seqs * block_len, num_kv_heads, head_dim)
            mask = (owner[:, :, None] & causal[:, None, :]).reshape(num_tokens, -1)
            return _online_block(carry, jnp.einsum("tkgd,skd->tkgs", qg, k),
                                 mask[:, None, None, :],
                                 lambda p: jnp.einsum("tkgs,skd->tkgd", p, v))
        # Each token against its own keys: for the G query heads of a KV head that is a
        # matrix-vector product per (token, KV head), which a dot runs as a batch of tiny
        # GEMMs with K and V first copied transposed. Products summed in place read K and V
        # as gathered: with the gathers above, 0.6x the time of 16 decodes' attention on 2
        # CPU cores (scripts/bench_cpu_attention.py).
        s = jnp.sum(qg[:, None] * k[:, :, :, None, :], axis=-1)  # [T, K, KVH, G]
        return _online_block(carry, jnp.moveaxis(s, 1, -1), causal[:, None, None, :],
                             lambda p: jnp.sum(jnp.moveaxis(p, -1, 1)[..., None]
                                               * v[:, :, :, None, :], axis=1))

    _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, _online_init(qg.shape))
    return _online_result(denom, acc).reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def _online_init(shape):
    """(running max, denominator, accumulator) of an online softmax over rows of `shape`
    [..., D]."""
    return (jnp.full(shape[:-1], DEFAULT_MASK_VALUE, jnp.float32),
            jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape, jnp.float32))


def _online_block(carry, s, mask, weighted_values):
    """One block of the online softmax: scores s [..., K], mask broadcast to them, and
    weighted_values(p [..., K]) -> [..., D], the values summed with weights p."""
    m, denom, acc = carry
    if mask is not None:  # None: every score counts
        s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    return (m_new, alpha * denom + p.sum(axis=-1),
            alpha[..., None] * acc + weighted_values(p))


def _online_result(denom, acc):
    return jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)


def _by_windows(qg, keys, tables, seq_lens, query_start, *, ppb: int, block_len: int,
                window: int, from_rows=None, pad: int = 0):
    """The "window" formulation: qg [T, KVH, G, D] -> [T, KVH, G, D] float32.

    Sequence s's tokens are rows query_start[s] .. query_start[s + 1] - 1, at positions
    ending at seq_lens[s] - 1. Each window of `window` of them (SMALL_WINDOW for a sequence
    that has no more tokens than that: a decode) is scored against the blocks of s's pages
    up to its last position; rows past the sequence's last token are computed but never
    written. Rows of no sequence (padding) stay 0. from_rows(s, start, n, out), if given,
    attends a chunk of more than SMALL_WINDOW tokens instead (`_rows_windows`, whose
    windows of `pad` rows must not run off the end either).
    """
    num_tokens = qg.shape[0]
    pad = max(window, pad)
    padded_q = jnp.pad(qg, ((0, pad),) + ((0, 0),) * 3)  # a window never runs off the end
    out = jnp.zeros_like(padded_q)
    num_blocks_max = tables.shape[1] // ppb

    def one_sequence(s, out):
        start, n = query_start[s], query_start[s + 1] - query_start[s]
        n_small = min(SMALL_WINDOW, window)
        chunk = functools.partial(windows, s, start, n, window) if from_rows is None \
            else functools.partial(from_rows, s, start, n)  # its own keys from the rows
        return jax.lax.cond(  # a decode (or a short chunk) pads to a small window only
            n <= n_small, functools.partial(windows, s, start, n, n_small), chunk, out)

    def windows(s, start, n, window, out):
        first_pos = seq_lens[s] - n
        rows = jnp.arange(window)

        def one_window(w, out):
            row0 = start + w * window
            q = jax.lax.dynamic_slice_in_dim(padded_q, row0, window)
            valid = w * window + rows < n
            pos = first_pos + w * window + rows
            last = first_pos + jnp.minimum(n, (w + 1) * window) - 1
            num_blocks = jnp.minimum(last // block_len + 1, num_blocks_max)

            def body(j, carry):
                pages = jax.lax.dynamic_slice_in_dim(tables[s], j * ppb, ppb)
                k, v = keys(pages)  # [block_len, KVH, D]
                causal = j * block_len + jnp.arange(block_len)[None, :] <= pos[:, None]
                return _online_block(carry, jnp.einsum("wkgd,nkd->wkgn", q, k),
                                     causal[:, None, None, :],
                                     lambda p: jnp.einsum("wkgn,nkd->wkgd", p, v))

            _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, _online_init(q.shape))
            old = jax.lax.dynamic_slice_in_dim(out, row0, window)
            new = jnp.where(valid[:, None, None, None], _online_result(denom, acc), old)
            return jax.lax.dynamic_update_slice_in_dim(out, new, row0, axis=0)

        return jax.lax.fori_loop(0, (n + window - 1) // window, one_window, out)

    return jax.lax.fori_loop(0, tables.shape[0], one_sequence, out)[:num_tokens]


# `_rows_windows`: query rows per window, and keys per block of the chunk's own, for
# chunks of up to twice as many tokens; longer ones take windows twice as big. 2 CPU cores,
# 30 layers of the demo's attention (scripts/bench_cpu_attention.py --prefill, with one
# size for all): one 1024-token prompt in 417 ms with windows of 256, against 498 ms with
# 128; 16 prompts of 128 tokens in 293 ms with 128, 673 ms with 256.
ROWS_WINDOW = 128


def _chunk_from_rows(q_h, k_h, v_h, keys, tables, seq_lens, s, start, n, out, *, small: int,
                     big: int, ppb: int, block_len: int):
    """`_rows_windows` for sequence s's chunk, in windows of `small` rows, or of `big` for
    chunks of more than 2 x small tokens."""
    run = functools.partial(_rows_windows, q_h, k_h, v_h, keys, tables[s],
                            seq_lens[s] - n, start, n, ppb=ppb, block_len=block_len)
    if big == small:
        return run(out, window=small)
    return jax.lax.cond(n > 2 * small, functools.partial(run, window=big),
                        functools.partial(run, window=small), out)


def _rows_windows(q_h, k_h, v_h, keys, table, history, start, n, out, *, window: int,
                  ppb: int, block_len: int):
    """A prefill chunk's attention with its own keys from this step's K/V rows. Rows
    start .. start + n - 1 of q_h [KVH, T + window, G, D] (float32, scaled) are the
    chunk's tokens, at positions history .. history + n - 1, and of k_h, v_h [KVH, T +
    window, D] their keys and values; the keys before them (history) are in the pages of
    `table`, read by keys(pages) in blocks of block_len (ppb pages). Each window of `window`
    rows is scored against the history's blocks, then against blocks of `window` of the
    chunk's keys up to its own (masked causally), one matmul per KV head and block:
    [window x G, D] x [D, window] for the chunk's. Returns `out` [T + pad, KVH, G, D] with
    the chunk's rows written.
    """
    kvh, _, group, d = q_h.shape
    rows = jnp.arange(window)

    def one_window(w, out):
        row0 = start + w * window
        q = jax.lax.dynamic_slice_in_dim(q_h, row0, window, axis=1)
        q = q.reshape(kvh, window * group, d)  # [KVH, window x G, D]

        def past(j, carry):  # a block of the history: every key before the chunk counts
            k, v = keys(jax.lax.dynamic_slice_in_dim(table, j * ppb, ppb))  # [len, KVH, D]
            seen = j * block_len + jnp.arange(block_len) < history
            return _online_block(carry, jnp.einsum("kqd,nkd->kqn", q, k), seen[None, None],
                                 lambda p: jnp.einsum("kqn,nkd->kqd", p, v))

        def own(j, carry, mask=None):  # a block of the chunk's own keys
            k = jax.lax.dynamic_slice_in_dim(k_h, start + j * window, window, axis=1)
            v = jax.lax.dynamic_slice_in_dim(v_h, start + j * window, window, axis=1)
            return _online_block(carry, jnp.einsum("kqd,knd->kqn", q, k), mask,
                                 lambda p: jnp.einsum("kqn,knd->kqd", p, v))

        carry = jax.lax.fori_loop(0, (history + block_len - 1) // block_len, past,
                                  _online_init(q.shape))
        # blocks before the window's own need no mask; its own is masked causally
        carry = jax.lax.fori_loop(0, w, own, carry)
        diagonal = rows[None, :] <= jnp.repeat(rows, group)[:, None]  # [window x G, window]
        _, denom, acc = own(w, carry, diagonal[None])
        new = _online_result(denom, acc).reshape(kvh, window, group, d)
        new = jnp.moveaxis(new, 0, 1)  # [window, KVH, G, D]
        old = jax.lax.dynamic_slice_in_dim(out, row0, window)
        valid = w * window + rows < n
        new = jnp.where(valid[:, None, None, None], new, old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, row0, axis=0)

    return jax.lax.fori_loop(0, (n + window - 1) // window, one_window, out)
