"""Causal flash attention for prefill over a packed batch of variable-length sequences, on
Pallas Mosaic GPU (Hopper: wgmma, TMA, warp specialisation).

Same contract as `pallas_kernels.flash_attention` (q [T, H, D], k/v [T, KVH, D], cu_seqlens
[B + 1] int32; row t attends the rows s <= t of its own sequence; rows at or past
cu_seqlens[B] are padding and give zeros), for bfloat16 or float16 and head_dim 64 or 128.

Kernel. Grid (num_q_heads, T / 128): neighbouring programs are the heads of one query tile,
so a group's heads share K/V in L2. A program runs three warpgroups:
  * a producer warpgroup streams the tile's key blocks (block_kv rows of one KV head) with
    TMA into a ring of `num_stages` K and V slots, refilling a K (V) slot as soon as both
    consumers have released it;
  * two consumer warpgroups own 64 query rows each. Per key block: S = Q K^T (wgmma from
    shared memory), online softmax in float32 (exp2 domain), O += P V with P taken straight
    from registers. A shared barrier lets the two consumers alternate, so one's softmax
    overlaps the other's matrix products (the FlashAttention-3 "ping-pong" schedule).
The key range of a tile is dynamic: from the block of its first row's sequence start to its
last row. A consumer masks only the blocks at a sequence start or on the diagonal; blocks
inside every row's window run without a mask, and blocks outside its own rows' windows are
only waited on and released (both consumers see every block of the ring).

Interpret mode (CPU, `interpret=True`) runs the same kernel through Mosaic GPU's interpreter,
which has no register-operand wgmma: there P goes through shared memory, and that is the
only difference from the compiled kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import LOG2_E, check_packed_inputs, first_key_rows

ROWS_PER_WARPGROUP = 64
TILE_Q = 2 * ROWS_PER_WARPGROUP  # two consumer warpgroups
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Key rows per block and K/V ring depth (measured best on an H200: 128 and 2)."""

    block_kv: int = 128
    num_stages: int = 2

    def check(self, head_dim: int, itemsize: int):
        if self.block_kv not in (64, 128):
            raise ValueError(f"BlockSizes.block_kv={self.block_kv} must be 64 or 128")
        if not isinstance(self.num_stages, int) or self.num_stages < 2:
            raise ValueError(f"BlockSizes.num_stages={self.num_stages} must be an int >= 2")
        smem = (TILE_Q + 2 * self.num_stages * self.block_kv) * head_dim * itemsize
        if smem > SMEM_BYTES:
            raise ValueError(f"BlockSizes(block_kv={self.block_kv}, num_stages="
                             f"{self.num_stages}) needs {smem} bytes of shared memory for "
                             f"head_dim={head_dim}; at most {SMEM_BYTES}")


def _transforms(cols, dtype):
    """Tiling and swizzle of a [rows, cols] tile in shared memory, for TMA and wgmma."""
    for swizzle in (128, 64, 32):
        elems = swizzle // jnp.dtype(dtype).itemsize
        if cols % elems == 0:
            return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))
    raise ValueError(f"no swizzle fits a tile of {cols} columns")


def p_scratch(consumers: int, block_kv: int, dtype):
    """Interpret mode's shared-memory P tile per consumer (see `accumulate_pv`)."""
    return plgpu.SMEM((consumers, ROWS_PER_WARPGROUP, block_kv), dtype,
                      transforms=_transforms(block_kv, dtype))


def mode_params(interpret: bool) -> dict:
    """plgpu.kernel's compiler and interpreter arguments, compiled or interpreted."""
    if interpret:
        return dict(compiler_params=None, interpret=plgpu.InterpretGPUParams())
    return dict(compiler_params=plgpu.CompilerParams(approx_math=True), interpret=None)


def paged_unsupported(q_dtype, pages_dtype, head_dim: int, page_size: int,
                      block_kv: int) -> str | None:
    """Why a paged Mosaic kernel cannot take these dtypes, head_dim and page size, or None."""
    if q_dtype not in (jnp.bfloat16, jnp.float16) or pages_dtype != q_dtype:
        return f"q and pages must be bf16 or f16 alike (got {q_dtype}, {pages_dtype})"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128 (got {head_dim})"
    if block_kv not in (64, 128) or block_kv % page_size:
        return f"page_size {page_size} must divide block_kv {block_kv} (64 or 128)"
    return None


def block_tables(page_tables, pages_per_block: int):
    """The page tables padded to whole blocks of pages: a block that runs past a table's end
    reads page 0, whose keys the kernels mask."""
    pages_per_seq = page_tables.shape[1]
    cols = -(-pages_per_seq // pages_per_block) * pages_per_block
    return jnp.pad(page_tables, ((0, 0), (0, cols - pages_per_seq)))


def take_turn(turn):
    """Arrive at the consumers' shared barrier and wait for the other consumer."""
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def claim_slot(i, stages: int, free):
    """The ring slot of block i, once the consumers have released the block before it there."""
    slot = lax.rem(i, stages)

    @pl.when(i >= stages)
    def _():
        plgpu.barrier_wait(free.at[slot])

    return slot


def drain(num_blocks, stages: int, k_free, v_free):
    """The producer waits for the last blocks' releases too, so that every barrier phase is
    consumed in order."""
    @pl.loop(jnp.maximum(num_blocks - stages, 0), num_blocks)
    def _drain(i):
        plgpu.barrier_wait(k_free.at[lax.rem(i, stages)])
        plgpu.barrier_wait(v_free.at[lax.rem(i, stages)])


def load_page_blocks(num_blocks, page_of, *, layer, kv_head, page_size: int,
                     pages_per_block: int, stages: int, k, v):
    """The producer of a paged kernel: key and value blocks 0 .. num_blocks - 1, page p of
    block i being page_of(i, p), one TMA copy per page into ring slot i % stages; then the
    wait for the last blocks' releases. k, v: (pages in gmem, ring, full, free barriers)."""
    def refill(i, gmem, smem, full, free):
        slot = claim_slot(i, stages, free)
        for p in range(pages_per_block):
            plgpu.copy_gmem_to_smem(gmem.at[layer, page_of(i, p), :, kv_head],
                                    smem.at[slot, pl.ds(p * page_size, page_size)],
                                    full.at[slot])

    @pl.loop(0, num_blocks)
    def _load(i):
        refill(i, *k)
        refill(i, *v)

    drain(num_blocks, stages, k[3], v[3])


def initial_carry(rows: int, head_dim: int):
    """A consumer's (running max, denominator, output) before its first block."""
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    return (plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.full((rows, head_dim), 0.0, jnp.float32),
                              plgpu.Layout.WGMMA))


def scores(qo, k_block, turn, shape):
    """S = Q K^T [rows, keys] float32 with wgmma; the consumer takes its turn while the
    product runs."""
    def qk(acc):
        plgpu.wgmma(acc, qo, k_block.transpose((1, 0)))
        take_turn(turn)
        return acc[...]

    return pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))


def softmax_block(s, carry, *, scale: float, masked: bool, dtype):
    """One block of the online softmax (exp2 domain) on scores s: (o rescaled, denominator,
    running max, P in dtype), fenced so that it finishes before the consumer hands over."""
    m, denom, o = carry
    m_new = jnp.maximum(m, s.max(axis=1) * scale)
    # A row with no key yet keeps m = -inf; shift it by 0 (its p is 0 anyway).
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - shift)
    p = jnp.exp2(s * scale - lax.broadcast_in_dim(shift, s.shape, [0]))
    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
    denom = denom * alpha + p.sum(axis=1)
    p16 = p.astype(dtype)
    return lax.optimization_barrier((o, denom, m_new, p16))


def accumulate_pv(o, p16, v_block, p_ref=None):
    """O += P V with wgmma, P straight from registers; or, with p_ref (interpret mode: Mosaic
    GPU's interpreter has no register-operand wgmma), P through that shared memory tile."""
    if p_ref is None:
        def pv(acc):
            plgpu.wgmma(acc, p16, v_block)

        return pl.run_state(pv)(plgpu.ACC.init(o))
    p_ref[...] = p16
    plgpu.commit_smem()

    def pv_smem(acc):
        plgpu.wgmma(acc, p_ref, v_block)
        return acc[...]

    return o + pl.run_scoped(pv_smem, plgpu.ACC(o.shape, jnp.float32))


def skip_block(slot, k_full, k_free, v_full, v_free, turn):
    """A block none of this consumer's rows needs: consume its phases, take both turns."""
    for full, free in ((k_full, k_free), (v_full, v_free)):
        plgpu.barrier_wait(full.at[slot])
        plgpu.barrier_arrive(free.at[slot])
    take_turn(turn)
    take_turn(turn)


def store_rows(carry, qo, o_rows):
    """O / denominator (0 for rows that saw no key) written through shared memory to o_rows."""
    _, denom, o = carry
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    qo[...] = (o * lax.broadcast_in_dim(inv, o.shape, [0])).astype(qo.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo, o_rows)
    plgpu.wait_smem_to_gmem(0)


def _kernel(kvs_gmem, q_gmem, k_gmem, v_gmem, o_gmem, qo_smem, k_smem, v_smem, q_bar,
            k_full, v_full, k_free, v_free, turn, p_smem=None, *, group: int, block_kv: int,
            stages: int, scale: float, interpret: bool):
    bq, bkv = ROWS_PER_WARPGROUP, block_kv
    head_dim = q_gmem.shape[-1]
    head = lax.axis_index("h")
    r0 = lax.axis_index("q") * TILE_Q
    j0 = jnp.minimum(kvs_gmem[r0], r0) // bkv  # the tile's first key block
    num_blocks = (r0 + TILE_Q - 1) // bkv + 1 - j0
    wg = lax.axis_index("wg")

    @pl.when(wg == 2)
    def _producer():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")
        kv_head = head // group

        def refill(i, gmem, smem, full, free):
            slot = claim_slot(i, stages, free)
            plgpu.copy_gmem_to_smem(gmem.at[pl.ds((j0 + i) * bkv, bkv), kv_head],
                                    smem.at[slot], full.at[slot])

        @pl.loop(0, num_blocks)
        def _load(i):
            refill(i, k_gmem, k_smem, k_full, k_free)
            refill(i, v_gmem, v_smem, v_full, v_free)

        drain(num_blocks, stages, k_free, v_free)

    @pl.when(wg < 2)
    def _consumer():
        if not interpret:
            plgpu.set_max_registers(232, action="increase")
        row0 = r0 + wg * bq
        qo = qo_smem.at[wg]
        p_ref = None if p_smem is None else p_smem.at[wg]  # interpret mode
        plgpu.copy_gmem_to_smem(q_gmem.at[pl.ds(row0, bq), head], qo, q_bar.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        starts = plgpu.load(kvs_gmem.at[pl.ds(row0, bq)], (), layout=row_layout, optimized=False)
        first = jnp.minimum(kvs_gmem[row0], row0) // bkv
        last = (row0 + bq - 1) // bkv
        # [lo, hi): blocks inside every row's window (kv_start is non-decreasing in t).
        lo = jnp.clip((kvs_gmem[row0 + bq - 1] + bkv - 1) // bkv, first, last + 1)
        hi = jnp.clip((row0 + 1) // bkv, lo, last + 1)
        plgpu.barrier_wait(q_bar.at[wg])

        def step(j, carry, masked: bool):
            slot = lax.rem(j - j0, stages)
            plgpu.barrier_wait(k_full.at[slot])
            s = scores(qo, k_smem.at[slot], turn, (bq, bkv))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                shape = (bq, bkv)
                row = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0,
                                                    layout=plgpu.Layout.WGMMA)
                col = j * bkv + plgpu.broadcasted_iota(jnp.int32, shape, 1,
                                                       layout=plgpu.Layout.WGMMA)
                start = lax.broadcast_in_dim(starts, shape, [0])
                s = jnp.where((col >= start) & (col <= row), s, -jnp.inf)
            o, denom, m_new, p16 = softmax_block(s, carry, scale=scale, masked=masked,
                                                 dtype=qo.dtype)
            plgpu.barrier_arrive(turn)  # softmax done: the other consumer may multiply
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)
            o = accumulate_pv(o, p16, v_smem.at[slot], p_ref)
            plgpu.barrier_arrive(v_free.at[slot])
            return m_new, denom, o

        def skip(j, carry):
            skip_block(lax.rem(j - j0, stages), k_full, k_free, v_full, v_free, turn)
            return carry

        carry = initial_carry(bq, head_dim)
        masked = functools.partial(step, masked=True)
        pl.when(wg == 1)(lambda: take_turn(turn))  # consumer 1 starts half a step behind
        carry = lax.fori_loop(j0, first, skip, carry)
        carry = lax.fori_loop(first, lo, masked, carry)
        carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(hi, last + 1, masked, carry)
        carry = lax.fori_loop(last + 1, j0 + num_blocks, skip, carry)
        pl.when(wg == 0)(lambda: take_turn(turn))
        store_rows(carry, qo, o_gmem.at[pl.ds(row0, bq), head])  # padding rows: 0


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def flash_attention_mgpu(
    q,  # [T, H, D]
    k,  # [T, KVH, D]
    v,  # [T, KVH, D]
    cu_seqlens,  # [B + 1] int32
    *,
    sm_scale: float | None = None,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
):
    """Causal varlen attention (Mosaic GPU); sm_scale defaults to head_dim ** -0.5."""
    check_packed_inputs(q, k, v, cu_seqlens, dtypes=(jnp.bfloat16, jnp.float16),
                        head_dims="64 or 128", head_dim_ok=lambda d: d in (64, 128))
    block_sizes.check(q.shape[-1], q.dtype.itemsize)
    return flash_attention_rows(q, k, v, first_key_rows(cu_seqlens, q.shape[0]),
                                sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)


def flash_attention_rows(q, k, v, kv_start, *, sm_scale=None, block_sizes=BlockSizes(),
                         interpret=False):
    """The kernel on rows given by their first key row: row t attends keys kv_start[t]..t.
    kv_start [T] int32 must be non-decreasing; a row with kv_start[t] > t is padding (zeros).
    flash_attention_mgpu's contract is the case kv_start = its sequence's first row."""
    num_tokens, num_heads, head_dim = q.shape
    scale = (head_dim**-0.5 if sm_scale is None else float(sm_scale)) * LOG2_E
    padded = -(-num_tokens // TILE_Q) * TILE_Q
    kv_start = jnp.pad(kv_start, (0, padded - num_tokens), constant_values=padded)
    # P is exactly 0 on padding keys, but 0 * NaN is not: padding rows of V become zeros.
    pad = ((0, padded - num_tokens), (0, 0), (0, 0))
    q, k = jnp.pad(q, pad), jnp.pad(k, pad)
    valid = kv_start <= jnp.arange(padded, dtype=jnp.int32)
    v = jnp.where(valid[:, None, None], jnp.pad(v, pad), 0)
    bs = block_sizes
    dtype = q.dtype
    tiles = _transforms(head_dim, dtype)
    extra = {}
    if interpret:
        extra["p_smem"] = p_scratch(2, bs.block_kv, dtype)
    call = plgpu.kernel(
        functools.partial(_kernel, group=num_heads // k.shape[1], block_kv=bs.block_kv,
                          stages=bs.num_stages, scale=scale, interpret=interpret),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=dict(
            qo_smem=plgpu.SMEM((2, ROWS_PER_WARPGROUP, head_dim), dtype, transforms=tiles),
            k_smem=plgpu.SMEM((bs.num_stages, bs.block_kv, head_dim), dtype, transforms=tiles),
            v_smem=plgpu.SMEM((bs.num_stages, bs.block_kv, head_dim), dtype, transforms=tiles),
            q_bar=plgpu.Barrier(num_arrivals=1, num_barriers=2),
            k_full=plgpu.Barrier(num_arrivals=1, num_barriers=bs.num_stages),
            v_full=plgpu.Barrier(num_arrivals=1, num_barriers=bs.num_stages),
            k_free=plgpu.Barrier(num_arrivals=2, num_barriers=bs.num_stages),
            v_free=plgpu.Barrier(num_arrivals=2, num_barriers=bs.num_stages),
            turn=plgpu.Barrier(num_arrivals=2),
            **extra,
        ),
        grid=(num_heads, padded // TILE_Q),
        grid_names=("h", "q"),
        num_threads=3,
        thread_name="wg",
        **mode_params(interpret),
    )
    return call(kv_start.astype(jnp.int32), q, k, v)[:num_tokens]
