"""q8_0 weights stored in column tiles for the GPU kernel (runner.q8_0_tiles).

A q8_0 linear weight lies inputs-first, [K..., N...] with its block scale [K / 32, N] along
the innermost input axis (models/quant.py). The decode kernel
(pallas_kernels/q8_0_matmul.py) gives each program BN output columns and a range of K: over
[K, N] that tile is K rows of BN bytes apart in memory, loads too short for HBM to run at
speed. Stored as column tiles, q [N / BN, K, BN] and scale [N / BN, K / 32, BN], each
program's weight is one contiguous run of memory: on an H200 the 8B shape's q8_0 matmul
kernels took 2-3% less time at B=1 and 6% less at B=32 (docs/quantization.md).

BN comes from the kernel's `tile_width` of the weight's output size as one device holds it,
so a tensor-parallel split keeps whole tiles: a column-parallel weight (q/k/v, gate/up) is
split over its tiles, a row-parallel one (o_proj, down_proj) over K, as before. A weight
whose outputs do not tile keeps its layout. Prefill (more than the kernel's rows) puts the
dequantized weight back in the checkpoint's layout and runs XLA's GEMM.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxserve.models.layer_select import LayerSelect

BLOCK = 32  # q8_0: inputs per scale
TILE_AXIS = "q8_0_tile"  # the logical name of a tile's columns (never split over a mesh)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Tiled:
    """A q8_0 weight stored [N / BN, K, BN] (an array, or a LayerSelect of them); `shape` is
    its inputs-first shape [K..., N...] as the model names it, the first `inputs` axes
    contracted. Its scale, passed beside it, is tiled the same way."""

    weight: jax.Array | LayerSelect
    shape: tuple[int, ...]
    inputs: int

    def tree_flatten(self):
        return (self.weight,), (self.shape, self.inputs)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        return cls(leaves[0], *static)


def tiled_shapes(shape: tuple[int, ...], inputs: int,
                 block_n: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(weight, scale) shapes of a [K..., N...] weight stored in tiles of block_n columns."""
    k, n = math.prod(shape[:inputs]), math.prod(shape[inputs:])
    return (n // block_n, k, block_n), (n // block_n, k // BLOCK, block_n)


def tile_width_of(shape: tuple[int, ...], inputs: int) -> int | None:
    """BN for a [K..., N...] weight as one device holds it, or None where it keeps its
    layout (its outputs do not tile, or K is not whole blocks)."""
    from pallas_kernels.q8_0_matmul import tile_width

    if math.prod(shape[:inputs]) % BLOCK:
        return None
    return tile_width(math.prod(shape[inputs:]))


def tile(w: jax.Array, inputs: int, block_n: int) -> jax.Array:
    """[K..., N...] (a weight, or its block scale) -> [N / block_n, K, block_n]."""
    k = math.prod(w.shape[:inputs])
    n = math.prod(w.shape[inputs:])
    return w.reshape(k, n // block_n, block_n).transpose(1, 0, 2)


def untile(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """tile's inverse: [N / BN, K, BN] -> `shape` ([K..., N...])."""
    return t.transpose(1, 0, 2).reshape(shape)


def tiled_einsum(eq: str, x: jax.Array, w: Tiled, scale: jax.Array, *, kernel: bool,
                 interpret: bool = False) -> jax.Array:
    """einsum(eq, x, dequantized w) in x's dtype, for `eq` "x_axes,w_axes->out" naming w's
    axes inputs-first, x's rows first and its contracted axes last, and the output rows then
    w's outputs. With `kernel` the q8_0 kernel reads the tiles; without, the weight is
    dequantized into its inputs-first layout for one XLA einsum (prefill)."""
    from jaxserve.models.quant import dequantize  # quant imports this module
    from pallas_kernels.q8_0_matmul import q8_0_matmul, tiling

    operands, out = eq.split("->")
    x_axes, w_axes = operands.split(",")
    rows = len(x_axes) - w.inputs
    if x_axes[rows:] != w_axes[:w.inputs] or out != x_axes[:rows] + w_axes[w.inputs:]:
        raise ValueError(f"a tiled q8_0 weight takes x [rows..., inputs...] . w [inputs..., "
                         f"outputs...] -> [rows..., outputs...]; got {eq!r}")
    weight = w.weight
    if not isinstance(weight, LayerSelect):  # as qeinsum: converted where its layer runs
        weight, scale = jax.lax.optimization_barrier((weight, scale))
    if not kernel:
        def dense(weight, scale):  # the tiles' blocks run along their K axis, as [K, N]'s
            return untile(dequantize(weight, scale), w.shape).astype(x.dtype)

        if isinstance(weight, LayerSelect):
            return weight.apply(lambda weight, x, scale: jnp.einsum(eq, x, dense(weight, scale)),
                                x, scale)
        return jnp.einsum(eq, x, dense(weight, scale))
    k = math.prod(w.shape[:w.inputs])
    x2 = x.reshape(math.prod(x.shape[:rows]), k)
    n = math.prod(w.shape[w.inputs:])
    tiles = tiling(k, n, block_n=weight.shape[-1])
    matmul = lambda weight, x2, scale: q8_0_matmul(x2, weight, scale, interpret=interpret,
                                                    **tiles)
    y = weight.apply(matmul, x2, scale) if isinstance(weight, LayerSelect) else \
        matmul(weight, x2, scale)
    return y.reshape(*x.shape[:rows], *w.shape[w.inputs:])
