"""Linear weights stored outputs-first, [outputs..., inputs...] (runner.transposed_weights).

The checkpoint's layout is inputs-first ([embed, heads, head_dim] for q/k/v, [mlp, embed]
for down_proj), and a matmul is x [T, K] . W [K, N]. On XLA's CPU backend that form is slow
for a few rows: a decoder layer's matmuls at 4-32 tokens run at 20-80 GFLOP/s on 2 cores,
while the same products taken the other way round, W [N, K] . x^T [K, T] -> y^T [N, T],
run at 36-125 (docs/performance.md, "Outputs-first weights"). From 256 rows on that form is
the slower one, and x [T, K] . W [N, K]^T is as fast as the checkpoint layout's.

So on a CPU a `Transposed` weight is multiplied as W . x^T for at most SMALL_ROWS rows
and as x . W^T above that; both read the weight as it lies. The optimization barriers
around the small form keep XLA's layout assignment from folding the two transposes (each a
copy of a few kilobytes) back into the matmul, which would bring back the slow form.

On a GPU every matmul takes the x . W^T form: there XLA's GEMM takes 4-8% less time so
on fp8 weights at 1-32 rows than as W . x^T (int8 within -8% and +4%; docs/performance.md,
"x . W^T for 8-bit weights on a GPU"). fp8 weights stored outputs-first are also
cuBLASLt's own fp8 layout: with `activation_rows` set (runner.fp8_activations) models/quant.py's
qeinsum multiplies them by fp8 activations; int8 weights so set (runner.int8_activations)
multiply int8 activations, s8 x s8 -> s32, which a CPU runs faster from 2 rows on. On a CPU
int8 weights alone multiply x split in two int8 parts the same way (models/quant.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxserve.models.layer_select import LayerSelect
from pallas_kernels.cpu_matmul import MAX_ROWS, cpu_matmul

SMALL_ROWS = 32  # on a CPU, rows of x up to which a Transposed weight is multiplied as W . x^T


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Transposed:
    """A linear weight stored [outputs..., inputs...]: `weight` (an array or a LayerSelect)
    with its `inputs` contracted axes last. An einsum names the weight's axes in their
    inputs-first order (as declared without runner.transposed_weights)."""

    weight: jax.Array | LayerSelect
    inputs: int  # how many of the weight's axes (its last ones) are contracted
    # 8-bit weights: rows from which x is quantized to the weight's format too (0: never)
    activation_rows: int = 0
    # float32 matmuls of 1-16 rows by pallas_kernels/cpu_matmul.py (runner.cpu_kernels)
    cpu_kernel: bool = False

    def tree_flatten(self):
        return (self.weight,), (self.inputs, self.activation_rows, self.cpu_kernel)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        return cls(leaves[0], *static)


def transposed_shape(shape: tuple, inputs: int) -> tuple:
    """An inputs-first shape (or tuple of axis names) -> the outputs-first one."""
    return (*shape[inputs:], *shape[:inputs])


def rows_first(m: int) -> bool:
    """Whether a matmul of m rows takes the x . W^T form (else W . x^T): above SMALL_ROWS,
    and at every row count off a CPU."""
    return m > SMALL_ROWS or jax.default_backend() != "cpu"


def kernel_rows(m: int, x_dtype, w_dtype, out_dtype) -> bool:
    """Whether a matmul of m rows goes to the CPU kernel (where Transposed.cpu_kernel is
    set): float32 throughout, 1 to MAX_ROWS rows (docs/performance.md, "CPU kernels for
    decode attention and matmuls"; "One to four rows by the CPU matmul kernel")."""
    f32 = jnp.dtype(jnp.float32)
    return (1 <= m <= MAX_ROWS and jnp.dtype(x_dtype) == f32 and jnp.dtype(w_dtype) == f32
            and jnp.dtype(out_dtype) == f32)


def transposed_einsum(eq: str, x: jax.Array, w: Transposed,
                      preferred_element_type=None) -> jax.Array:
    """einsum(eq, x, weight) for a `eq` "x_axes,w_axes->out_axes" that names w's axes
    inputs-first, and `w` stored outputs-first. The weight is cast to x's dtype inside the
    matmul; the result has `preferred_element_type` (default: x's dtype)."""
    operands, out = eq.split("->")
    x_axes, w_axes = operands.split(",")
    w_in, w_out = w_axes[:w.inputs], w_axes[w.inputs:]
    rows = "".join(a for a in x_axes if a not in w_in)
    sizes = dict(zip(x_axes, x.shape, strict=True))
    k, m = math.prod(sizes[a] for a in w_in), math.prod(sizes[a] for a in rows)
    out_dtype = preferred_element_type or x.dtype

    integer = jnp.issubdtype(x.dtype, jnp.integer)
    if w.cpu_kernel and kernel_rows(m, x.dtype, w.weight.dtype, out_dtype):
        # y [M, N] by pallas_kernels/cpu_matmul.py: x [M, K] . W [N, K]^T as they lie
        x2 = jnp.einsum(f"{x_axes}->{rows}{w_in}", x).reshape(m, k)
        y = _apply(w.weight, lambda weight, x2: cpu_matmul(x2, weight.reshape(-1, k)), x2)
    elif not rows_first(m) and not integer:  # y^T [N, M] = W [N, K] . x^T [K, M]
        xt = jax.lax.optimization_barrier(jnp.einsum(f"{x_axes}->{w_in}{rows}", x).reshape(k, m))

        def dot(weight, xt):
            return jnp.dot(weight.reshape(-1, k).astype(x.dtype), xt,
                           preferred_element_type=out_dtype)

        y = jax.lax.optimization_barrier(_apply(w.weight, dot, xt)).T  # [M, N]
    else:  # y [M, N] = x [M, K] . W [N, K]^T, both operands contracted on their last axis
        # int8 activations (s8 x s8 -> s32) where a CPU takes W . x^T: y^T = W . x^T with x
        # as it lies and no barrier; XLA's CPU backend runs the integer dot 2-5x slower in the
        # float form above at 2-16 rows (docs/quantization.md)
        weight_first = not rows_first(m)
        x2 = jnp.einsum(f"{x_axes}->{rows}{w_in}", x).reshape(m, k)

        def dot(weight, x2):
            w2 = weight.reshape(-1, k).astype(x.dtype)
            return jax.lax.dot_general(*((w2, x2) if weight_first else (x2, w2)),
                                       (((1,), (1,)), ((), ())),
                                       preferred_element_type=out_dtype)

        y = _apply(w.weight, dot, x2)
        y = y.T if weight_first else y  # [M, N]
    y = y.reshape(*(sizes[a] for a in rows), *w.weight.shape[:len(w_out)])
    return jnp.einsum(f"{rows}{w_out}->{out}", y)


def _apply(weight, fn, operand):
    if isinstance(weight, LayerSelect):
        return weight.apply(fn, operand)
    return fn(weight, operand)

