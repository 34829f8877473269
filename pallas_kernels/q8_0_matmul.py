"""x [M, K] . W [K, N] for a q8_0 weight (GGUF's Q8_0: int8 with one scale per block of 32
consecutive inputs), reading the int8 bytes and the block scales only.

XLA does not fuse a block-scaled dequantization into its GPU GEMM: it writes the whole weight
in bfloat16 to HBM and reads it back, every step (docs/quantization.md, "GGUF Q8_0 on a
GPU"). Here each program owns BN output columns and one of `splits` ranges of K, which it
walks block_k inputs a step. For each block of 32 inputs, x's 32 columns [M, 32] times the
block's int8 rows converted to x's dtype [32, BN], in float32, scaled by the block's BN
scales, is added up. So the weight is read once, as int8, and the product is the
dequantized one's: sum_b s[b, n] sum_j x[m, 32b + j] q[32b + j, n]. The `splits` partial
sums [splits, M, N] (float32) are added by XLA. x's rows are padded to a power of two, at
least 16 (a Triton dot's smallest).

The weight lies either as the checkpoint has it, q [K, N] and scale [K / 32, N], or in
column tiles, q [N / BN, K, BN] and scale [N / BN, K / 32, BN] (`tiled`; models/q8_0_tiles.py
stores them so on a GPU): then each program's weight is one contiguous run of memory, where
[K, N] gives it K rows of BN bytes, each a separate short load.

Pallas Triton; `interpret=True` runs the same kernel on a CPU (the tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK = 32  # q8_0: inputs per scale
MIN_ROWS = 16  # a Triton dot's smallest M: x's rows are padded up to it


def _kernel(x_ref, q_ref, s_ref, o_ref, *, block_k: int):
    rows, cols = o_ref.shape[1], o_ref.shape[2]

    def step(i, acc):  # block_k // BLOCK blocks, their loads issued together
        for j in range(block_k // BLOCK):
            b = i * (block_k // BLOCK) + j
            x = x_ref[:, pl.ds(b * BLOCK, BLOCK)]  # [M, 32]
            q = q_ref[pl.ds(b * BLOCK, BLOCK), :].astype(x.dtype)  # [32, BN]
            s = s_ref[pl.ds(b, 1), :].astype(jnp.float32)  # [1, BN]
            acc = acc + jnp.dot(x, q, preferred_element_type=jnp.float32) * s
        return acc

    acc = jax.lax.fori_loop(0, q_ref.shape[0] // block_k, step,
                            jnp.zeros((rows, cols), jnp.float32))
    o_ref[0] = acc


@functools.partial(jax.jit, static_argnames=("block_n", "splits", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def q8_0_matmul(x, q, scale, *, block_n: int = 128, splits: int = 4, block_k: int = BLOCK,
                num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """x [M, K] . (q [K, N] int8 with scale [K // 32, N]) -> [M, N] in x's dtype; or, for a
    tiled weight q [N // BN, K, BN] with scale [N // BN, K // 32, BN], the same product, N =
    N // BN * BN (block_n is then BN). K must split into `splits` ranges of whole steps of
    block_k (a multiple of 32), N into tiles of block_n."""
    m, k = x.shape
    tiled = q.ndim == 3
    if tiled:
        block_n = q.shape[2]
    n = q.shape[0] * q.shape[2] if tiled else q.shape[1]
    want = (n // block_n, k // BLOCK, block_n) if tiled else (k // BLOCK, n)
    if q.shape[-2 if tiled else 0] != k or scale.shape != want or k % BLOCK:
        form = "[N // BN, K // 32, BN]" if tiled else "[K // 32, N]"
        raise ValueError(f"q8_0_matmul: x {x.shape}, q {q.shape} and scale {scale.shape} do "
                         f"not fit (scale must be {form}, K a multiple of {BLOCK})")
    if block_k % BLOCK or k % (splits * block_k) or n % block_n:
        raise ValueError(f"q8_0_matmul: K={k} in {splits} splits of steps of {block_k} "
                         f"(whole blocks of {BLOCK}) and N={n} in tiles of {block_n} do not "
                         f"divide")
    rows = max(MIN_ROWS, 1 << (m - 1).bit_length())  # Pallas Triton takes powers of two
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    ks = k // splits
    if tiled:  # tile j's rows s*ks ... (s+1)*ks, the tile axis squeezed out
        weight_specs = [pl.BlockSpec((None, ks, block_n), lambda j, s: (j, s, 0)),
                        pl.BlockSpec((None, ks // BLOCK, block_n), lambda j, s: (j, s, 0))]
    else:
        weight_specs = [pl.BlockSpec((ks, block_n), lambda j, s: (s, j)),
                        pl.BlockSpec((ks // BLOCK, block_n), lambda j, s: (s, j))]
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((rows, ks), lambda j, s: (0, s)), *weight_specs],
        out_specs=pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        interpret=interpret, name="q8_0_matmul",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    )(xp, q, scale)
    return out.sum(axis=0)[:m].astype(x.dtype)


# programs (column tiles x splits) a launch aims for: on an H200 the 8B shape's matmuls ran
# fastest near 500-800, and with two blocks a step (block_k 64) rather than one or four
# (bench/results/q8_0-matmul-{sweep,unroll}-h200-2026-12-03.json)
PROGRAMS = 768


def tile_width(n: int) -> int | None:
    """Columns a program owns for N = n: 128, or 64 where 128 does not divide n; None where
    neither does."""
    return next((b for b in (128, 64) if n % b == 0), None)


def tiling(k: int, n: int, block_n: int | None = None) -> dict | None:
    """block_n, splits and block_k for x [M, k] . W [k, n]: tiles of tile_width(n) columns
    (or block_n, a tiled weight's), K split until about PROGRAMS programs run, two blocks a
    step where the splits hold an even number of blocks; None where nothing tiles."""
    block_n = block_n or tile_width(n)
    if block_n is None or k % BLOCK:
        return None
    splits = 1
    while n // block_n * splits * 2 <= PROGRAMS and (k // BLOCK) % (splits * 2) == 0:
        splits *= 2
    block_k = 2 * BLOCK if k % (splits * 2 * BLOCK) == 0 else BLOCK
    return {"block_n": block_n, "splits": splits, "block_k": block_k}

