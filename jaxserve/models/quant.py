"""Weight-only quantization of the linear layers: int8 or fp8 (e4m3) with a scale per
output channel, or q8_0: int8 with a scale per block of 32 inputs.

A quantized linear weight is stored as two parameters: the weight itself, same path, shape
and logical axes as in full precision but in the storage dtype (`int8`,
`float8_e4m3fn`), and `<path>_scale`, float32, with the weight's output axes only (the
layer axis included). A weight w with contraction axes C is

    scale = max |w| over C / QMAX,    q = round(w / scale)   (int8; fp8: cast)

and a matmul over C reads q converted to the activation dtype, then multiplies its output
by the scale: x . (q * scale) = (x . q) * scale, because the scale does not depend on the
contracted index. On a CPU an int8 q is not converted: x is split into two int8 parts and
multiplied s8 x s8 -> s32 (`_rounded_x_einsum`), which XLA's CPU backend runs 2-3x faster
than the float dot of a converted weight, for a product within about 1e-5 of it. Under
tensor parallelism a row-parallel weight (o_proj, down_proj) keeps its whole output axis,
so each device's partial sum is scaled before the all-reduce.

`q8_0` is int8 with one scale per block of 32 weights along the innermost contracted axis
(GGUF's Q8_0): the scale keeps every axis of the weight, that one divided by 32, under the
logical name `<axis>_blocks`; the scale is rounded to float16, as Q8_0 stores it, and the
values are rounded as llama.cpp rounds them, so a float tensor quantizes to the bytes
llama.cpp or the gguf package would write. A block scale varies along the contraction, so
the matmul converts q * scale to the activation dtype, layer by layer, before the einsum;
on a GPU, decode-sized einsums go to pallas_kernels/q8_0_matmul.py, which reads the blocks.
Quantizing a Q8_0 tensor's dequantized values gives back its own bytes: amax = 127 * d
exactly (d has 11 significant bits), so the scale is d and round(q * d / d) = q.

Which weights: the attention projections (q, k, v, o), a dense MLP's gate, up and down
projections, and every MoE expert's (a scale per expert and output channel, or block). The
router, the embedding and the LM head stay in the model dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.layer_select import LayerSelect
from jaxserve.models.q8_0_tiles import Tiled, tiled_einsum
from jaxserve.models.transposed import Transposed, transposed_einsum

KV_STORAGE = {"int8": np.dtype(np.int8), "fp8": np.dtype(jnp.float8_e4m3fn)}
STORAGE = {**KV_STORAGE, "q8_0": np.dtype(np.int8)}
QMAX = {"int8": 127.0, "q8_0": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448
SCALE = "_scale"  # suffix of a quantized weight's scale parameter
BLOCK = 32  # q8_0: weights per scale along the contraction
BLOCKS = "_blocks"  # suffix of the logical name of a block scale's blocked axis
# tokens from which fp8 weights outputs-first multiply fp8 activations (runner.fp8_activations):
# on an H200, the 8B layer's matmuls at 128 rows take 0.69x the converting GEMM's time fp8 x fp8
# (a tie at 64, slower at 32), from 512 rows 0.53-0.56x (docs/performance.md, "x . W^T for
# 8-bit weights on a GPU", "fp8 activations for prefill")
FP8_ACTIVATION_ROWS = 128
# tokens from which int8 weights outputs-first multiply int8 activations, rounded once
# (runner.int8_activations): on a 2-core CPU the demo's layer matmuls took 0.59-0.80x the
# converting matmul's time s8 x s8 -> s32 at 2-16 rows, and no less at 1 row, where XLA runs
# a one-row dot as a matrix-vector loop (docs/quantization.md, "int8 activations on CPU");
# below it, x is split in two int8 parts as for int8 weights alone (_rounded_x_einsum)
INT8_ACTIVATION_ROWS = 2
ACTIVATION_ROWS = {"fp8": FP8_ACTIVATION_ROWS, "int8": INT8_ACTIVATION_ROWS}


def scale_spec(names: tuple[str, ...], shape: tuple[int, ...], contracted: tuple[str, ...],
               mode: str = "int8") -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, logical names) of a weight's scale: the weight's axes less the contracted;
    for q8_0 all of them, the innermost contracted one in blocks of BLOCK."""
    if mode == "q8_0":
        i = max(i for i, n in enumerate(names) if n in contracted)
        if shape[i] % BLOCK:
            raise ValueError(f"q8_0 needs the contracted axis {names[i]} ({shape[i]}) to be a "
                             f"multiple of {BLOCK}")
        return (*shape[:i], shape[i] // BLOCK, *shape[i + 1:]), \
            (*names[:i], names[i] + BLOCKS, *names[i + 1:])
    keep = [i for i, n in enumerate(names) if n not in contracted]
    return tuple(shape[i] for i in keep), tuple(names[i] for i in keep)


def block_problem(model_config, tensor: int = 1) -> str | None:
    """Why q8_0 cannot hold this model's linear layers on `tensor` ranks, or None: each
    contracted axis a multiple of BLOCK, and a row-parallel one's blocks divisible."""
    c = model_config
    sizes = {"hidden_size": c.hidden_size, "head_dim": c.head_dim}
    if len(c.moe_layers) < c.num_layers:  # dense MLPs
        sizes["intermediate_size"] = c.intermediate_size
    if c.is_moe:
        sizes["moe_intermediate_size"] = c.moe_intermediate_size
    for name, size in sizes.items():
        if size % BLOCK:
            return f"q8_0 quantizes in blocks of {BLOCK} inputs, but {name}={size} is not a " \
                   f"multiple of {BLOCK}"
        if name.endswith("intermediate_size") and (size // BLOCK) % tensor:
            return f"q8_0 splits {name}={size} into {size // BLOCK} blocks of {BLOCK}, " \
                   f"which mesh.tensor={tensor} does not divide"
    return None


def _blocked(x, axis: int):
    """x with `axis` split into (blocks, BLOCK)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // BLOCK, BLOCK, *x.shape[axis + 1:])


def quantize(w, contracted_axes: tuple[int, ...], mode: str):
    """(q in the storage dtype, float32 scale without the contracted axes), as jax arrays.

    One implementation for `convert --quantize` (on the host's CPU, layer by layer) and for
    quantizing as a checkpoint loads (on its devices), so both store the same bytes.
    """
    w32 = jnp.asarray(w).astype(jnp.float32)
    if mode == "q8_0":  # contracted_axes: the one blocked axis
        (axis,) = contracted_axes
        blocks = _blocked(w32, axis)
        # As llama.cpp and gguf write Q8_0: d = amax / 127 in float32, q = x * (1 / d)
        # rounded half away from zero, and d stored as float16.
        d = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True) / QMAX[mode]
        v = blocks * jnp.where(d > 0, 1 / jnp.where(d > 0, d, 1.0), 0.0)
        # (floor(|v| + 0.5) is not exact: 0.49999997 + 0.5 rounds up to 1 in float32)
        a = jnp.abs(v)
        whole = jnp.floor(a)
        q = jnp.clip(jnp.sign(v) * (whole + (a - whole >= 0.5)), -127, 127)
        scale = d.astype(jnp.float16).astype(jnp.float32)
        return q.astype(STORAGE[mode]).reshape(w32.shape), jnp.squeeze(scale, axis + 1)
    amax = jnp.max(jnp.abs(w32), axis=contracted_axes, keepdims=True)
    # The quotient is tested, not amax: below about 1e-35 it is a denormal that XLA
    # flushes to zero, and w / 0 would store NaN (fp8) where zeros belong. A NaN (a NaN in
    # the row) stays: the row dequantizes to NaN, as its float weights compute.
    scale = amax / QMAX[mode]
    scale = jnp.where(scale == 0, jnp.float32(1.0), scale).astype(jnp.float32)
    x = w32 / scale
    if mode == "int8":
        q = jnp.clip(jnp.round(x), -127, 127).astype(STORAGE[mode])
    else:
        q = jnp.clip(x, -QMAX[mode], QMAX[mode]).astype(STORAGE[mode])
    return q, jnp.squeeze(scale, axis=contracted_axes)


def dequantize(q, scale, contracted_axes: tuple[int, ...] | None = None):
    """float32 weights back from (q, scale); contracted_axes may be left out for q8_0."""
    q32 = jnp.asarray(q).astype(jnp.float32)
    axis = block_axis(q.shape, scale.shape)
    if axis is not None:
        return (_blocked(q32, axis) * jnp.expand_dims(scale, axis + 1)).reshape(q.shape)
    return q32 * jnp.expand_dims(scale, contracted_axes)


def block_axis(weight_shape, scale_shape) -> int | None:
    """The weight axis a q8_0 scale has in blocks; None for a per-channel scale."""
    if len(scale_shape) != len(weight_shape):
        return None
    return next(i for i, (w, s) in enumerate(zip(weight_shape, scale_shape, strict=True))
                if w != s)


def quantized_weights(specs: dict) -> dict[str, tuple[int, ...]]:
    """{weight path: its contracted axes} from the param specs of a quantized model (see
    llama.param_specs): each weight that has a `_scale` entry, contracted over the axes its
    scale lacks (q8_0: the blocked axis, named `<axis>_blocks` in the scale). The model's
    layers declare both, so this is the one list of them."""
    return {path: tuple(i for i, n in enumerate(names) if n not in specs[path + SCALE][1])
            for path, (_, names) in specs.items() if path + SCALE in specs}


def kv_pages_dtype(kv_dtype: str, model_dtype) -> np.dtype:
    """The KV pages' dtype for cache.kv_dtype: the model's (auto), or int8/fp8 storage."""
    return np.dtype(jnp.dtype(model_dtype) if kv_dtype == "auto" else KV_STORAGE[kv_dtype])


def quantize_vectors(x: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """K or V vectors [..., head_dim] -> (q [..., head_dim] in the storage dtype, float32
    scale [...]): one scale per vector, as the KV cache stores them (cache.kv_dtype)."""
    return quantize(x, (x.ndim - 1,), mode)


def hadamard(n: int) -> np.ndarray:
    """The orthonormal n x n Hadamard matrix (Sylvester's construction), float32; n must be a
    power of two. Symmetric, so it is its own inverse: H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def kv_mode(dtype) -> str | None:
    """int8 | fp8 for a quantized cache's storage dtype; None for a float cache."""
    return {v: k for k, v in KV_STORAGE.items()}.get(jnp.dtype(dtype))


def qeinsum(eq: str, x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    """einsum(eq, x, w) in x's dtype; a quantized w is converted on the fly and the output
    scaled by `scale` (broadcast over the output's trailing axes, which are w's outputs).
    A LayerSelect w (runner.layer_loop) runs the einsum on its layer's weight as it lies; a
    Transposed w (runner.transposed_weights) is stored outputs-first (models/transposed.py).
    An 8-bit Transposed w with `activation_rows` (runner.fp8_activations,
    runner.int8_activations), given at least that many tokens (x's first axis, and the
    output's), multiplies x quantized to the weight's format with one scale per token: fp8 x
    fp8 on a GPU's tensor cores with a bfloat16 result, or int8 x int8 with an int32 one,
    then both scales. Otherwise, on a CPU, an int8 w (per channel) multiplies x split into
    two int8 parts (_rounded_x_einsum). A Tiled w is a q8_0 weight in column tiles
    (runner.q8_0_tiles, models/q8_0_tiles.py)."""
    if isinstance(w, Tiled):
        return tiled_einsum(eq, x, w, scale, kernel=_q8_0_kernel_here(x))
    if isinstance(w, Transposed):
        if scale is None:
            return transposed_einsum(eq, x, w)
        mode = kv_mode(w.weight.dtype)  # int8 | fp8: the cache's storage is the weights' too
        if w.activation_rows and x.shape[0] >= w.activation_rows and mode:
            return _rounded_x_einsum(eq, x, w, scale, mode, parts=1)
        if mode == "int8" and jax.default_backend() == "cpu":
            return _rounded_x_einsum(eq, x, w, scale, mode, parts=2)
        y = transposed_einsum(eq, x, w, preferred_element_type=jnp.float32)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)
    if isinstance(w, LayerSelect):
        return w.apply(lambda weight, x, scale: qeinsum(eq, x, weight, scale), x, scale)
    if scale is None:
        return jnp.einsum(eq, x, w)
    # The barrier keeps XLA from moving the conversion out of the layer onto the whole
    # stacked weight (on GPU it converted every layer's weights at once, 8.7 GB of scratch
    # for the 8B shape): each layer's weight is converted as its layer runs.
    w, scale = jax.lax.optimization_barrier((w, scale))
    if block_axis(w.shape, scale.shape) is not None:  # q8_0: the scale varies along inputs
        y = q8_0_kernel_einsum(eq, x, w, scale) if _q8_0_kernel_here(x) else None
        return y if y is not None else jnp.einsum(eq, x, dequantize(w, scale).astype(x.dtype))
    if kv_mode(w.dtype) == "int8" and jax.default_backend() == "cpu":
        return _rounded_x_einsum(eq, x, w, scale, "int8", parts=2)
    y = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rounded_x_einsum(eq: str, x: jax.Array, w, scale: jax.Array, mode: str,
                      parts: int) -> jax.Array:
    """qeinsum of x and an 8-bit w (per channel, either layout) with x rounded per token to
    w's format `mode` in `parts` parts, each the rounding (absmax / QMAX) of what the parts
    before it left; all multiply w in one dot of `parts` times the rows, fp8 x fp8 with a
    bfloat16 result or int8 x int8 with an exact int32 one, then each part's scale and w's.
    One part: runner.fp8_/int8_activations. Two int8 parts: int8 weights alone on a CPU, x
    within 1 / 254^2 of its token's absmax (one rounding: 1 / 254), so the product stays
    within about 1e-5 of the converted weight's. XLA's CPU backend converts an int8 weight
    to float32 in memory before a float dot, and runs a one-row dot as a matrix-vector loop;
    the integer dot of two or more rows goes to its GEMM library and reads the int8 bytes as
    they lie (docs/quantization.md, "int8 weights on a CPU: x in two int8 parts")."""
    axes = tuple(range(1, x.ndim))
    rest, xq, x_scales = x.astype(jnp.float32), [], []
    for _ in range(parts):
        q, s = quantize(rest, axes, mode)  # s [tokens]
        xq.append(q)
        x_scales.append(s)
        rest = rest - dequantize(q, s, axes)  # (unused after the last part: not computed)
    xq = jnp.concatenate(xq) if parts > 1 else xq[0]
    # int8: int32 sums are exact while K * 127^2 < 2^31, K < 133k
    acc_type = jnp.bfloat16 if mode == "fp8" else jnp.int32
    acc = (transposed_einsum(eq, xq, w, preferred_element_type=acc_type)
           if isinstance(w, Transposed) else
           jnp.einsum(eq, xq, w, preferred_element_type=acc_type))
    t, b = x.shape[0], (-1, *(1,) * (acc.ndim - 1))
    y = acc[:t].astype(jnp.float32) * x_scales[0].reshape(b)
    for i in range(1, parts):
        y = y + acc[i * t:(i + 1) * t].astype(jnp.float32) * x_scales[i].reshape(b)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


# q8_0 on a GPU: decode-sized matmuls (at most this many tokens) run the Pallas kernel that
# reads the int8 blocks and their scales (pallas_kernels/q8_0_matmul.py); XLA would write
# each dequantized weight to memory first (docs/quantization.md, "GGUF Q8_0 on a GPU").
Q8_0_KERNEL_ROWS = 64


def _q8_0_kernel_here(x) -> bool:
    return jax.default_backend() == "gpu" and x.shape[0] <= Q8_0_KERNEL_ROWS


def q8_0_kernel_einsum(eq: str, x, w, scale, *, interpret: bool = False):
    """einsum(eq, x, dequantize(w, scale)) through the q8_0 kernel, or None where the
    equation is not x [rows..., contracted...] . w [contracted..., outputs...] ->
    [rows..., outputs...] with whole blocks, or the sizes do not tile."""
    from pallas_kernels.q8_0_matmul import q8_0_matmul, tiling

    operands, out = eq.split("->")
    x_axes, w_axes = operands.split(",")
    contracted = "".join(a for a in x_axes if a in w_axes)
    rows, w_out = x_axes[:len(x_axes) - len(contracted)], w_axes[len(contracted):]
    if x_axes != rows + contracted or w_axes != contracted + w_out or out != rows + w_out \
            or block_axis(w.shape, scale.shape) != len(contracted) - 1:
        return None
    m = math.prod(x.shape[:len(rows)])
    k = math.prod(w.shape[:len(contracted)])
    n = math.prod(w.shape[len(contracted):])
    tiles = tiling(k, n)
    if tiles is None:
        return None
    y = q8_0_matmul(x.reshape(m, k), w.reshape(k, n), scale.reshape(k // BLOCK, n),
                    interpret=interpret, **tiles)
    return y.reshape(*x.shape[:len(rows)], *w.shape[len(contracted):])
