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

A sequence's last item ends at its last row, overlapping the item before it when its rows
are not a multiple of 128 (a row in both is computed twice, to the same value). So every
item is whole and inside its sequence: the consumers load their query rows from q and store
their output rows into `out` in place, with no gather, scatter or select around the kernel,
and a step with no such sequence costs only the launch of programs that exit at once. Only
the sequences in `take` with at least 128 query tokens are attended; the caller gives the
rest to another kernel.

Interpret mode (CPU, `interpret=True`) runs the same kernel through Mosaic GPU's
interpreter, with P through shared memory as in the flash kernel. The interpreter deadlocked
on an earlier version of this kernel (items with rows past their sequence), so the CPU tests
run it in a child process with a time limit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention_mgpu import (
    LOG2_E,
    ROWS_PER_WARPGROUP,
    SMEM_BYTES,
    TILE_Q,
    _transforms,
    accumulate_pv,
    block_tables,
    initial_carry,
    load_page_blocks,
    mode_params,
    p_scratch,
    paged_unsupported,
    scores,
    skip_block,
    softmax_block,
    store_rows,
    take_turn,
)


def _items_per_sequence(query_start, take):
    """[S] query tokens of each sequence in `take` with 128 or more (0 for the others), and
    its 128-row items."""
    q_len = query_start[1:] - query_start[:-1]
    q_len = jnp.where(take & (q_len >= TILE_Q), q_len, 0)
    return q_len, (q_len + TILE_Q - 1) // TILE_Q


def prefill_items(seq_lens, query_start, take, num_items):
    """[4, W] int32 rows (sequence, first packed row, rows, position of the first row): the
    128-row items of the sequences `_items_per_sequence` keeps, in order, each sequence's
    last one ending at its last row; unused items have 0 rows."""
    num_seqs = seq_lens.shape[0]
    q_len, blocks = _items_per_sequence(query_start, take)
    ends = jnp.cumsum(blocks).astype(jnp.int32)
    w = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, w, side="right", method="compare_all").astype(jnp.int32)
    valid = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1)
    first = jnp.minimum((w - (ends[seq] - blocks[seq])) * TILE_Q, q_len[seq] - TILE_Q)
    first = jnp.where(valid, first, 0)
    rows = jnp.where(valid, TILE_Q, 0)
    pos0 = seq_lens[seq] - q_len[seq] + first
    return jnp.stack([seq, query_start[seq] + first, rows, pos0]).astype(jnp.int32)


def _kernel(items_gmem, tables_gmem, layer_gmem, q_gmem, k_gmem, v_gmem, o_gmem, qo_smem,
            rows_smem, k_smem, v_smem, q_bar, k_full, v_full, k_free, v_free, turn, p_smem=None,
            *, group: int, block_kv: int, page_size: int, table_cols: int, stages: int,
            scale: float, interpret: bool):
    bq, bkv = ROWS_PER_WARPGROUP, block_kv
    pages_per_block = bkv // page_size
    head_dim = q_gmem.shape[-1]
    head = lax.axis_index("h")
    item = lax.axis_index("w")
    wg = lax.axis_index("wg")
    seq = items_gmem[0, item]
    row0 = items_gmem[1, item]  # the item's packed rows row0 + r sit at positions pos0 + r
    used = items_gmem[2, item] > 0
    pos0 = items_gmem[3, item]
    layer = layer_gmem[0]
    num_blocks = jnp.where(used, (pos0 + TILE_Q - 1) // bkv + 1, 0)

    @pl.when(wg == 2)
    def _producer():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")
        load_page_blocks(
            num_blocks, lambda j, p: tables_gmem[seq * table_cols + j * pages_per_block + p],
            layer=layer, kv_head=head // group, page_size=page_size,
            pages_per_block=pages_per_block, stages=stages,
            k=(k_gmem, k_smem, k_full, k_free), v=(v_gmem, v_smem, v_full, v_free))

    @pl.when((wg < 2) & used)  # an unused item writes nothing
    def _consumer():
        if not interpret:
            plgpu.set_max_registers(232, action="increase")
        r0 = wg * bq  # this consumer's first row in the item
        qo = qo_smem.at[wg]
        p_ref = None if p_smem is None else p_smem.at[wg]  # interpret mode
        # TMA into a tiled (swizzled) tile needs rows at a multiple of 8: the rows go through
        # an untiled staging tile, and back out through it
        rows, staging = pl.ds(row0 + r0, bq), rows_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_gmem.at[rows, head], staging, q_bar.at[wg])
        # the last block any of its rows sees, and the blocks every row sees in full
        last = (pos0 + r0 + bq - 1) // bkv
        full_end = (pos0 + r0 + 1) // bkv
        plgpu.barrier_wait(q_bar.at[wg])
        qo[...] = plgpu.load(staging, (), layout=plgpu.Layout.WGMMA)
        plgpu.commit_smem()

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
                s = jnp.where(col <= pos0 + row, s, -jnp.inf)
            o, denom, m_new, p16 = softmax_block(s, carry, scale=scale, masked=masked,
                                                 dtype=qo.dtype)
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)
            o = accumulate_pv(o, p16, v_smem.at[slot], p_ref)
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
        store_rows(carry, staging, o_gmem.at[rows, head])


def unsupported(q_dtype, pages_dtype, head_dim: int, page_size: int, block_kv: int = 128,
                stages: int = 2) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    reason = paged_unsupported(q_dtype, pages_dtype, head_dim, page_size, block_kv)
    if reason:
        return reason
    smem = (2 * TILE_Q + 2 * stages * block_kv) * head_dim * jnp.dtype(q_dtype).itemsize
    if smem > SMEM_BYTES:
        return f"block_kv {block_kv} x {stages} stages need {smem} bytes of shared memory"
    return None


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_items", "block_kv", "stages",
                                             "interpret"))
def paged_prefill_mgpu(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start, take,
                       out, *, sm_scale: float, max_items: int, block_kv: int = 128,
                       stages: int = 2, interpret: bool = False):
    """`out` [T, H, D] with the rows of the sequences in `take` [S] bool that have at least
    128 query tokens replaced by their causal attention over their pages (the contract of
    `ragged_paged_attention_reference`). max_items bounds those sequences' 128-row items;
    rows past it are not attended."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, kv_heads, _ = k_pages.shape
    reason = unsupported(q.dtype, k_pages.dtype, head_dim, page_size, block_kv, stages)
    if reason:
        raise ValueError(f"paged_prefill_mgpu: {reason}")
    if num_tokens < TILE_Q:
        return out  # no sequence of 128 query tokens
    items = prefill_items(seq_lens, query_start, take, max_items)
    per_block = block_kv // page_size
    tables = block_tables(page_tables, per_block)
    tiles = _transforms(head_dim, q.dtype)
    extra = {}
    if interpret:
        extra["p_smem"] = p_scratch(2, block_kv, q.dtype)
    call = plgpu.kernel(
        functools.partial(_kernel, group=num_heads // kv_heads, block_kv=block_kv,
                          page_size=page_size, table_cols=tables.shape[1], stages=stages,
                          scale=float(sm_scale) * LOG2_E, interpret=interpret),
        out_type=(),
        scratch_types=dict(
            qo_smem=plgpu.SMEM((2, ROWS_PER_WARPGROUP, head_dim), q.dtype, transforms=tiles),
            rows_smem=plgpu.SMEM((2, ROWS_PER_WARPGROUP, head_dim), q.dtype),
            k_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            v_smem=plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
            q_bar=plgpu.Barrier(num_arrivals=1, num_barriers=2),
            k_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            v_full=plgpu.Barrier(num_arrivals=per_block, num_barriers=stages),
            k_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            v_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            turn=plgpu.Barrier(num_arrivals=2),
            **extra,
        ),
        grid=(num_heads, max_items),
        grid_names=("h", "w"),
        num_threads=3,
        thread_name="wg",
        **mode_params(interpret),
    )
    o_ref = jax.new_ref(out.astype(q.dtype))  # written in place by the kernel
    call(items, tables.reshape(-1), jnp.asarray(layer, jnp.int32).reshape(1), q, k_pages,
         v_pages, o_ref)
    return jax.ref.freeze(o_ref).astype(out.dtype)
