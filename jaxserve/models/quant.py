"""Weight-only quantization of the linear layers: int8 or fp8 (e4m3) with a scale per
output channel.

A quantized linear weight is stored as two parameters: the weight itself, same path, shape
and logical axes as in full precision but in the storage dtype (`int8`,
`float8_e4m3fn`), and `<path>_scale`, float32, with the weight's output axes only (the
layer axis included). A weight w with contraction axes C is

    scale = max |w| over C / QMAX,    q = round(w / scale)   (int8; fp8: cast)

and a matmul over C reads q converted to the activation dtype, then multiplies its output
by the scale: x . (q * scale) = (x . q) * scale, because the scale does not depend on the
contracted index. Under tensor parallelism a row-parallel weight (o_proj, down_proj) keeps
its whole output axis, so each device's partial sum is scaled before the all-reduce.

Which weights: the attention projections (q, k, v, o), a dense MLP's gate, up and down
projections, and every MoE expert's (a scale per expert and output channel). The router,
the embedding and the LM head stay in the model dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STORAGE = {"int8": np.dtype(np.int8), "fp8": np.dtype(jnp.float8_e4m3fn)}
QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448
SCALE = "_scale"  # suffix of a quantized weight's scale parameter


def scale_spec(names: tuple[str, ...], shape: tuple[int, ...],
               contracted: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, logical names) of a weight's scale: the weight's axes less the contracted."""
    keep = [i for i, n in enumerate(names) if n not in contracted]
    return tuple(shape[i] for i in keep), tuple(names[i] for i in keep)


def quantize(w, contracted_axes: tuple[int, ...], mode: str):
    """(q in the storage dtype, float32 scale without the contracted axes), as jax arrays.

    One implementation for `convert --quantize` (on the host's CPU, layer by layer) and for
    quantizing as a checkpoint loads (on its devices), so both store the same bytes.
    """
    w32 = jnp.asarray(w).astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contracted_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / QMAX[mode], jnp.float32(1.0)).astype(jnp.float32)
    x = w32 / scale
    if mode == "int8":
        q = jnp.clip(jnp.round(x), -127, 127).astype(STORAGE[mode])
    else:
        q = jnp.clip(x, -QMAX[mode], QMAX[mode]).astype(STORAGE[mode])
    return q, jnp.squeeze(scale, axis=contracted_axes)


def dequantize(q, scale, contracted_axes: tuple[int, ...]):
    """float32 weights back from (q, scale)."""
    return jnp.asarray(q).astype(jnp.float32) * jnp.expand_dims(scale, contracted_axes)


def quantized_weights(specs: dict) -> dict[str, tuple[int, ...]]:
    """{weight path: its contracted axes} from the param specs of a quantized model (see
    llama.param_specs): each weight that has a `_scale` entry, contracted over the axes its
    scale lacks. The model's layers declare both, so this is the one list of them."""
    return {path: tuple(i for i, n in enumerate(names) if n not in specs[path + SCALE][1])
            for path, (_, names) in specs.items() if path + SCALE in specs}


def kv_pages_dtype(kv_dtype: str, model_dtype) -> np.dtype:
    """The KV pages' dtype for cache.kv_dtype: the model's (auto), or int8/fp8 storage."""
    return np.dtype(jnp.dtype(model_dtype) if kv_dtype == "auto" else STORAGE[kv_dtype])


def quantize_vectors(x: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """K or V vectors [..., head_dim] -> (q [..., head_dim] in the storage dtype, float32
    scale [...]): one scale per vector, as the KV cache stores them (cache.kv_dtype)."""
    return quantize(x, (x.ndim - 1,), mode)


def kv_mode(dtype) -> str | None:
    """int8 | fp8 for a quantized cache's storage dtype; None for a float cache."""
    return {v: k for k, v in STORAGE.items()}.get(jnp.dtype(dtype))


def qeinsum(eq: str, x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    """einsum(eq, x, w) in x's dtype; a quantized w is converted on the fly and the output
    scaled by `scale` (broadcast over the output's trailing axes, which are w's outputs)."""
    if scale is None:
        return jnp.einsum(eq, x, w)
    # The barrier keeps XLA from moving the conversion out of the layer onto the whole
    # stacked weight (on GPU it converted every layer's weights at once, 8.7 GB of scratch
    # for the 8B shape): each layer's weight is converted as its layer runs.
    w, scale = jax.lax.optimization_barrier((w, scale))
    y = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)
