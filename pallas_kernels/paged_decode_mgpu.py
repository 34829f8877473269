"""Paged decode attention on Hopper (Pallas Mosaic GPU): one query token per sequence, keys
and values read from the pages.

A program owns one sequence, one KV head and one split of the sequence's key blocks (flash
decoding). Its query rows are the group's query heads (4 for 32:8 heads), padded to the 64
rows of a wgmma tile: decode is bound by the K/V bytes, and a 64-row product costs as much
to load as a 4-row one. Warpgroups:
  * a producer loads the query rows once, then each block of `block_kv` keys and values with
    one TMA copy per page into a ring of `stages` slots;
  * one or two consumers (`consumers`; two take the split's blocks in turn, block i to
    consumer i % 2), each with its own online softmax (float32, exp2 domain): S = Q K^T and
    O += P V with wgmma (P from registers), keys past the sequence's length masked. Each
    consumer writes its own partial: the normalised output rows of the group and their
    log2-sum-exp. One consumer leaves the registers to ptxas, and its program needs 96 KiB
    of shared memory with block_kv 64, so two programs can share an SM.
A program (or consumer) with no key block does nothing at all: XLA knows from the lengths
which partials exist, merges those of each (sequence, head) and puts the rows in place.
With one consumer and one split there is nothing to merge: the kernel writes the rows into
the output in place.

Not in the engine's path: on an H200, over the 32 layers of the 8B shape's attention, its
best choice per bucket ran at 0.89-1.20x the Triton decode kernel as the engine runs it
(`scripts/bench_split_k.py`; docs/performance.md), slower at the largest, so decode stays
on `paged_attention.py`.

Interpret mode (CPU, `interpret=True`) runs the same kernel through Mosaic GPU's
interpreter, with P through shared memory (its wgmma takes no register operand).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention_mgpu import (
    LOG2_E,
    ROWS_PER_WARPGROUP,
    SMEM_BYTES,
    _transforms,
    accumulate_pv,
    block_tables,
    initial_carry,
    load_page_blocks,
    mode_params,
    p_scratch,
    paged_unsupported,
    softmax_block,
)

CONSUMERS = 2
# Programs (sequence rows x KV heads x splits) the automatic split count aims at: one or two
# fit an SM (by shared memory), and a few waves even out sequences of unequal lengths. On an
# H200 one split of one consumer beat it for buckets of 32 full rows (docs/performance.md).
TARGET_PROGRAMS = 4 * 132
MAX_SPLITS = 32


def _kernel(lens_gmem, rows_gmem, tables_gmem, layer_gmem, q_gmem, k_gmem, v_gmem, o_gmem,
            lse_gmem=None, *, q_rows, qo_smem, lse_smem, k_smem, v_smem, q_bar, k_full, v_full,
            k_free, v_free, o_rows=None, p_smem=None, group: int, block_kv: int, page_size: int,
            table_cols: int, stages: int, splits: int, consumers: int, scale: float,
            interpret: bool):
    bq, bkv = ROWS_PER_WARPGROUP, block_kv
    pages_per_block = bkv // page_size
    head_dim = q_gmem.shape[-1]
    seq = lax.axis_index("s")
    kv_head = lax.axis_index("h")
    split = lax.axis_index("k")
    wg = lax.axis_index("wg")
    seq_len = lens_gmem[seq]  # 0 for a sequence this kernel does not attend
    layer = layer_gmem[0]
    heads = pl.ds(kv_head * group, group)
    first, num_blocks = split_blocks(seq_len, split, block_kv=bkv, splits=splits)

    # one consumer: no register shift, so that ptxas's own count lets programs share an SM
    shift_registers = consumers > 1 and not interpret

    @pl.when(wg == consumers)
    def _producer():
        if shift_registers:
            plgpu.set_max_registers(40, action="decrease")

        @pl.when(num_blocks > 0)
        def _q():
            plgpu.copy_gmem_to_smem(q_gmem.at[rows_gmem[seq], heads],
                                    q_rows.at[pl.ds(0, group)], q_bar)

        base = seq * table_cols + first * pages_per_block
        load_page_blocks(
            num_blocks, lambda i, p: tables_gmem[base + i * pages_per_block + p],
            layer=layer, kv_head=kv_head, page_size=page_size,
            pages_per_block=pages_per_block, stages=stages,
            k=(k_gmem, k_smem, k_full, k_free), v=(v_gmem, v_smem, v_full, v_free))

    @pl.when((wg < consumers) & (num_blocks > wg))
    def _consumer():
        if shift_registers:
            plgpu.set_max_registers(232, action="increase")
        plgpu.barrier_wait(q_bar)
        # rows past the group hold whatever shared memory held: their results are never stored
        qo = qo_smem.at[wg]
        qo[...] = plgpu.load(q_rows, layout=plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        p_ref = None if p_smem is None else p_smem.at[wg]  # interpret mode

        def step(t, carry):
            i = wg + consumers * t
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_full.at[slot])

            def qk(acc):
                plgpu.wgmma(acc, qo, k_smem.at[slot].transpose((1, 0)))
                return acc[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            col = (first + i) * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1,
                                                            layout=plgpu.Layout.WGMMA)
            s = jnp.where(col < seq_len, s, -jnp.inf)
            o, denom, m_new, p16 = softmax_block(s, carry, scale=scale, masked=True,
                                                 dtype=q_rows.dtype)
            plgpu.barrier_wait(v_full.at[slot])
            o = accumulate_pv(o, p16, v_smem.at[slot], p_ref)
            plgpu.barrier_arrive(v_free.at[slot])
            return m_new, denom, o

        mine = (num_blocks - wg + consumers - 1) // consumers
        m, denom, o = lax.fori_loop(0, mine, step, initial_carry(bq, head_dim))
        # one consumer: its output goes out through the query rows, read long before
        out_rows = q_rows if o_rows is None else o_rows.at[wg]
        out_rows[...] = (o / lax.broadcast_in_dim(denom, o.shape, [0])).astype(out_rows.dtype)
        if lse_gmem is None:  # the only partial: the group's rows of the output, in place
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_rows.at[pl.ds(0, group)],
                                    o_gmem.at[rows_gmem[seq], heads])
        else:
            lse_smem.at[wg][...] = m + jnp.log2(denom)
            plgpu.commit_smem()
            part = split * consumers + wg
            plgpu.copy_smem_to_gmem(out_rows.at[pl.ds(0, group)], o_gmem.at[seq, part, heads])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[seq, part, kv_head])
        plgpu.wait_smem_to_gmem(0)


def split_blocks(seq_len, split, *, block_kv: int, splits: int):
    """(first key block, number of key blocks) of a sequence of seq_len keys in split
    `split` of `splits`; of 2 consumers, consumer c takes blocks c, c + 2, ... of those."""
    total = (seq_len + block_kv - 1) // block_kv
    per_split = (total + splits - 1) // splits
    first = split * per_split
    return first, jnp.clip(total - first, 0, per_split)


def unsupported(q_dtype, pages_dtype, head_dim: int, page_size: int, group: int,
                block_kv: int = 128, stages: int = 2, consumers: int = 2) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    reason = paged_unsupported(q_dtype, pages_dtype, head_dim, page_size, block_kv)
    if reason:
        return reason
    if consumers not in (1, 2):
        return f"consumers must be 1 or 2 (got {consumers})"
    if group > ROWS_PER_WARPGROUP:
        return f"{group} query heads per KV head; at most {ROWS_PER_WARPGROUP}"
    if stages < 2 or stages % consumers:
        # a slot must always serve the same consumer, which waits on its barrier phases
        return f"stages must be a multiple of {consumers} and 2 or more (got {stages})"
    smem = _smem_bytes(head_dim, jnp.dtype(q_dtype).itemsize, block_kv, stages, consumers)
    if smem > SMEM_BYTES:
        return f"block_kv {block_kv} x {stages} stages need {smem} bytes of shared memory"
    return None


def _smem_bytes(head_dim, itemsize, block_kv, stages, consumers):
    """The query rows, each consumer's query tile, output rows (of 2 consumers) and
    log2-sum-exp, the ring."""
    tiles = 1 + consumers + (consumers if consumers > 1 else 0)
    rows = tiles * ROWS_PER_WARPGROUP + 2 * stages * block_kv
    return rows * head_dim * itemsize + consumers * ROWS_PER_WARPGROUP * 4


def auto_splits(num_seqs: int, kv_heads: int, max_blocks: int) -> int:
    """Key-block splits per sequence for a bucket of num_seqs rows: enough programs to fill
    the GPU (TARGET_PROGRAMS), never more splits than a longest sequence has blocks."""
    want = math.ceil(TARGET_PROGRAMS / max(1, num_seqs * kv_heads))
    return max(1, min(want, max_blocks, MAX_SPLITS))


def merge_partials(o_part, lse_part, written, group: int):
    """[S, H, D] float32 from the kernel's partials: o_part [S, P, H, D] (each normalised
    over its own keys) and lse_part [S, P, KVH, 64] log2-sum-exp (its first `group` rows
    are the group's heads), of which only those where written [S, P] hold values. A
    sequence with none gets zeros."""
    num_seqs, parts, num_heads, _ = o_part.shape
    lse = lse_part[..., :group].reshape(num_seqs, parts, num_heads)
    lse = jnp.where(written[..., None], lse, -jnp.inf)
    top = lse.max(axis=1, keepdims=True)
    weight = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # [S, P, H]
    o = jnp.where(written[..., None, None], o_part.astype(jnp.float32), 0.0)
    total = weight.sum(axis=1)
    acc = jnp.einsum("sph,sphd->shd", weight, o)
    return acc / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "block_kv", "stages",
                                             "consumers", "interpret"))
def paged_decode_mgpu(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start, take,
                      out, *, sm_scale: float, num_splits: int | None = None,
                      block_kv: int = 128, stages: int = 2, consumers: int = CONSUMERS,
                      interpret: bool = False):
    """`out` [T, H, D] with the row of every sequence in `take` [S] bool that has exactly one
    query token replaced by its attention over the sequence's pages (the contract of
    `ragged_paged_attention_reference`); other rows are left as they are. num_splits: key
    splits per sequence (None: `auto_splits`)."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, kv_heads, _ = k_pages.shape
    num_seqs = page_tables.shape[0]
    group = num_heads // kv_heads
    reason = unsupported(q.dtype, k_pages.dtype, head_dim, page_size, group, block_kv, stages,
                         consumers)
    if reason:
        raise ValueError(f"paged_decode_mgpu: {reason}")
    per_block = block_kv // page_size
    tables = block_tables(page_tables, per_block)
    splits = num_splits or auto_splits(num_seqs, kv_heads, tables.shape[1] // per_block)
    starts = query_start[:-1]
    decode = take & (query_start[1:] - starts == 1)
    lens = jnp.where(decode, seq_lens, 0).astype(jnp.int32)
    rows = jnp.minimum(starts, num_tokens - 1).astype(jnp.int32)
    parts = consumers * splits
    tiles = _transforms(head_dim, q.dtype)
    rows_tile = (ROWS_PER_WARPGROUP, head_dim)
    extra = {}
    if interpret:
        extra["p_smem"] = p_scratch(consumers, block_kv, q.dtype)
    if consumers > 1:
        extra["o_rows"] = plgpu.SMEM((consumers, *rows_tile), q.dtype)
    in_place = parts == 1  # one consumer, one split: no merge
    call = plgpu.kernel(
        functools.partial(_kernel, group=group, block_kv=block_kv, page_size=page_size,
                          table_cols=tables.shape[1], stages=stages, splits=splits,
                          consumers=consumers, scale=float(sm_scale) * LOG2_E,
                          interpret=interpret),
        out_type=() if in_place else (
            jax.ShapeDtypeStruct((num_seqs, parts, num_heads, head_dim), q.dtype),
            jax.ShapeDtypeStruct((num_seqs, parts, kv_heads, ROWS_PER_WARPGROUP),
                                 jnp.float32)),
        scratch_types=dict(
            q_rows=plgpu.SMEM(rows_tile, q.dtype),
            qo_smem=plgpu.SMEM((consumers, *rows_tile), q.dtype, transforms=tiles),
            lse_smem=plgpu.SMEM((consumers, ROWS_PER_WARPGROUP), jnp.float32),
            k_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            v_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            q_bar=plgpu.Barrier(num_arrivals=1),
            k_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            v_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            k_free=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            v_free=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            **extra,
        ),
        grid=(num_seqs, kv_heads, splits),
        grid_names=("s", "h", "k"),
        num_threads=consumers + 1,
        thread_name="wg",
        **mode_params(interpret),
    )
    args = (lens, rows, tables.reshape(-1), jnp.asarray(layer, jnp.int32).reshape(1), q,
            k_pages, v_pages)
    if in_place:
        o_ref = jax.new_ref(out.astype(q.dtype))  # the kernel writes the decode rows
        call(*args, o_ref)
        return jax.ref.freeze(o_ref).astype(out.dtype)
    o_part, lse_part = call(*args)
    _, num_blocks = split_blocks(lens[:, None], jnp.arange(splits), block_kv=block_kv,
                                     splits=splits)
    written = (num_blocks[:, :, None] > jnp.arange(consumers)).reshape(num_seqs, parts)
    merged = merge_partials(o_part, lse_part, written, group).astype(out.dtype)
    return out.at[jnp.where(decode, starts, num_tokens)].set(merged, mode="drop")
