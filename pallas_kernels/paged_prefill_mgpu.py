"""Causal attention of long prefill chunks over their pages, on Hopper (Pallas Mosaic GPU).

For a chunk whose keys are partly in the cache already (a prompt's later chunk, or a prompt
after a cached prefix), the flash kernel cannot be used: its keys are not all in this
step's rows. This kernel reads them from the pages. The work is cut into items of 128 query
rows of one sequence; a program owns one item of one head and runs the flash kernel's three
warpgroups (`flash_attention_mgpu.py`): a producer that loads each block of `block_kv` keys
with one TMA copy per page into a ring of `stages` slots, and two consumers of 64 rows each
that take turns so that one's softmax overlaps the other's matrix products. Blocks left of
every row's diagonal run unmasked; blocks past a consumer's rows are only waited on and
released.

The items' query rows are gathered into tiles by XLA and their output scattered back (a few
times the q bytes: small next to the attention of a chunk of 512 tokens or more). Only the
sequences in `take` are attended; the caller gives the rest to another kernel.

No interpret mode: Mosaic GPU's interpreter deadlocks on this kernel's schedule (with
several items and pages) though the compiled kernel is correct, so it is tested compiled
on a GPU (tests/pallas_kernels/test_paged_prefill_mgpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import sequence_rows
from pallas_kernels.flash_attention_mgpu import (
    LOG2_E,
    ROWS_PER_WARPGROUP,
    SMEM_BYTES,
    TILE_Q,
    _transforms,
    accumulate_pv,
    claim_slot,
    drain,
    initial_carry,
    scores,
    skip_block,
    softmax_block,
    store_rows,
    take_turn,
)


def _items_per_sequence(query_start, take):
    """[S] query tokens of each sequence in `take` (0 for the others), and its 128-row items."""
    q_len = jnp.where(take, query_start[1:] - query_start[:-1], 0)
    return q_len, (q_len + TILE_Q - 1) // TILE_Q


def prefill_items(seq_lens, query_start, take, num_items):
    """[4, W] int32 rows (sequence, first packed row, rows, position of the first row): the
    128-row items of the sequences in `take` [S] bool, in order; unused items have 0 rows."""
    num_seqs = seq_lens.shape[0]
    q_len, blocks = _items_per_sequence(query_start, take)
    ends = jnp.cumsum(blocks).astype(jnp.int32)
    w = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, w, side="right").astype(jnp.int32)
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first = (w - (ends[seq] - blocks[seq])) * TILE_Q
    rows = jnp.where(valid, jnp.clip(q_len[seq] - first, 0, TILE_Q), 0)
    pos0 = seq_lens[seq] - q_len[seq] + first
    return jnp.stack([seq, query_start[seq] + first, rows, pos0]).astype(jnp.int32)


def item_rows(query_start, take, num_tokens):
    """[T] int32: the row of each packed row in the items' tiles (the layout prefill_items
    gives), and [T] bool: whether the row belongs to a sequence in `take`."""
    num_seqs = take.shape[0]
    _, blocks = _items_per_sequence(query_start, take)
    first_item = (jnp.cumsum(blocks) - blocks).astype(jnp.int32)
    seq, valid = sequence_rows(query_start, num_tokens)
    seq = jnp.minimum(seq, num_seqs - 1)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    return first_item[seq] * TILE_Q + t - query_start[seq], valid & take[seq]


def _kernel(items_gmem, tables_gmem, layer_gmem, q_gmem, k_gmem, v_gmem, o_gmem, qo_smem,
            k_smem, v_smem, q_bar, k_full, v_full, k_free, v_free, turn, *, group: int,
            block_kv: int, page_size: int, table_cols: int, stages: int, scale: float):
    bq, bkv = ROWS_PER_WARPGROUP, block_kv
    pages_per_block = bkv // page_size
    head_dim = q_gmem.shape[-1]
    head = lax.axis_index("h")
    item = lax.axis_index("w")
    wg = lax.axis_index("wg")
    seq = items_gmem[0, item]
    n = items_gmem[2, item]  # query rows of this item: row r sits at position pos0 + r
    pos0 = items_gmem[3, item]
    layer = layer_gmem[0]
    num_blocks = jnp.where(n > 0, (pos0 + n - 1) // bkv + 1, 0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = head // group

        def refill(j, gmem, smem, full, free):
            slot = claim_slot(j, stages, free)
            for p in range(pages_per_block):
                page = tables_gmem[seq * table_cols + j * pages_per_block + p]
                plgpu.copy_gmem_to_smem(gmem.at[layer, page, :, kv_head],
                                        smem.at[slot, pl.ds(p * page_size, page_size)],
                                        full.at[slot])

        @pl.loop(0, num_blocks)
        def _load(j):
            refill(j, k_gmem, k_smem, k_full, k_free)
            refill(j, v_gmem, v_smem, v_full, v_free)

        drain(num_blocks, stages, k_free, v_free)

    @pl.when((wg < 2) & (n > 0))  # an unused item writes nothing
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        r0 = wg * bq  # this consumer's first row in the item
        qo = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(item * TILE_Q + r0, bq), head], qo,
                                q_bar.at[wg])
        # the last block any of its rows sees, and the blocks every row sees in full
        last = jnp.where(n > r0, (pos0 + jnp.minimum(n, r0 + bq) - 1) // bkv, -1)
        full_end = jnp.clip((pos0 + r0 + 1) // bkv, 0, last + 1)
        full_end = jnp.where(n >= r0 + bq, full_end, 0)  # rows past n: mask every block
        plgpu.barrier_wait(q_bar.at[wg])

        def step(j, carry, masked: bool):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_full.at[slot])
            s = scores(qo, k_smem.at[slot], turn, (bq, bkv))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                shape = (bq, bkv)
                row = r0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                col = j * bkv + plgpu.broadcasted_iota(jnp.int32, shape, 1,
                                                       layout=plgpu.Layout.WGMMA)
                s = jnp.where((col <= pos0 + row) & (row < n), s, -jnp.inf)
            o, denom, m_new, p16 = softmax_block(s, carry, scale=scale, masked=masked,
                                                 dtype=qo.dtype)
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)
            o = accumulate_pv(o, p16, v_smem.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return m_new, denom, o

        def skip(j, carry):
            skip_block(lax.rem(j, stages), k_full, k_free, v_full, v_free, turn)
            return carry

        carry = initial_carry(bq, head_dim)
        pl.when(wg == 1)(lambda: take_turn(turn))  # consumer 1 starts half a step behind
        carry = lax.fori_loop(0, full_end, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(full_end, last + 1, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(last + 1, num_blocks, skip, carry)
        pl.when(wg == 0)(lambda: take_turn(turn))
        store_rows(carry, qo, o_gmem.at[pl.ds(item * TILE_Q + r0, bq), head])


def unsupported(q_dtype, pages_dtype, head_dim: int, page_size: int, block_kv: int = 128,
                stages: int = 2) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    if q_dtype not in (jnp.bfloat16, jnp.float16) or pages_dtype != q_dtype:
        return f"q and pages must be bf16 or f16 alike (got {q_dtype}, {pages_dtype})"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128 (got {head_dim})"
    if block_kv not in (64, 128) or block_kv % page_size:
        return f"page_size {page_size} must divide block_kv {block_kv} (64 or 128)"
    smem = (TILE_Q + 2 * stages * block_kv) * head_dim * jnp.dtype(q_dtype).itemsize
    if smem > SMEM_BYTES:
        return f"block_kv {block_kv} x {stages} stages need {smem} bytes of shared memory"
    return None


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_items", "block_kv", "stages"))
def paged_prefill_mgpu(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start, take,
                       out, *, sm_scale: float, max_items: int, block_kv: int = 128,
                       stages: int = 2):
    """`out` [T, H, D] with the rows of the sequences in `take` [S] bool replaced by their
    causal attention over their pages (the contract of `ragged_paged_attention_reference`).
    max_items bounds the 128-row items of those sequences; rows past it are not attended."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_tables.shape
    reason = unsupported(q.dtype, k_pages.dtype, head_dim, page_size, block_kv, stages)
    if reason:
        raise ValueError(f"paged_prefill_mgpu: {reason}")
    items = prefill_items(seq_lens, query_start, take, max_items)
    r = jnp.arange(TILE_Q, dtype=jnp.int32)
    rows = items[1][:, None] + r[None, :]  # [W, 128]: the packed row of each item row
    used = r[None, :] < items[2][:, None]
    q_items = q[jnp.where(used, rows, 0).reshape(-1)]
    # a block that runs past the table's end reads page 0 (masked): pad the table to blocks
    per_block = block_kv // page_size
    cols = -(-pages_per_seq // per_block) * per_block
    tables = jnp.pad(page_tables, ((0, 0), (0, cols - pages_per_seq)))
    tiles = _transforms(head_dim, q.dtype)
    call = plgpu.kernel(
        functools.partial(_kernel, group=num_heads // kv_heads, block_kv=block_kv,
                          page_size=page_size, table_cols=cols, stages=stages,
                          scale=float(sm_scale) * LOG2_E),
        out_type=jax.ShapeDtypeStruct(q_items.shape, q.dtype),
        scratch_types=dict(
            qo_smem=plgpu.SMEM((2, ROWS_PER_WARPGROUP, head_dim), q.dtype, transforms=tiles),
            k_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            v_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            q_bar=plgpu.Barrier(num_arrivals=1, num_barriers=2),
            k_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            v_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            turn=plgpu.Barrier(num_arrivals=2),
        ),
        grid=(num_heads, max_items),
        grid_names=("h", "w"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    out_items = call(items, tables.reshape(-1), jnp.asarray(layer, jnp.int32).reshape(1),
                     q_items, k_pages, v_pages)
    # the output is gathered back by row, not scattered by item (see docs/performance.md)
    src, taken = item_rows(query_start, take, num_tokens)
    taken &= src < max_items * TILE_Q
    back = out_items[jnp.minimum(src, max_items * TILE_Q - 1)]
    return jnp.where(taken[:, None, None], back.astype(out.dtype), out)
