"""Mixture-of-experts MLP: routing, tokens sorted by expert, grouped matmuls (ragged_dot).

Routing (as Mixtral and Qwen3-MoE define it): router logits [T, experts] in float32, softmax,
top-k, and when `norm_topk_prob` the k weights renormalised to sum to 1. No capacity limit:
no token is ever dropped.

Expert compute: the T*k (token, expert) pairs are sorted by expert, so each expert's rows are
contiguous, and one grouped matmul per projection runs over the groups (`grouped_matmul`).
Each pair's output is scaled by its routing weight and added back to its token's row.

The grouped matmul is `jax.lax.ragged_dot` (XLA) everywhere, except on Hopper GPUs with
bf16/f16 weights, where JAX's Pallas Mosaic GPU kernel (`ragged_dot_mgpu`) was faster at
every decode batch measured (scripts/bench_grouped_matmul.py, docs/performance.md): at 32
tokens x top-2 on the Mixtral shapes 0.24 ms against XLA's 0.27-0.31 ms per projection, at
128 tokens 0.24-0.26 ms against 0.32-0.56 ms. Neither skips experts no token was routed to.

Expert parallelism (`expert` mesh axis, replicated tokens + psum): every device of a data
shard holds the same tokens and routes all of them, but computes only the pairs routed to
its own experts (num_experts / expert of them); pairs for other experts sort to the end, past
the groups, and contribute zero. The partial outputs are summed over the `expert` axis, in
the same all-reduce that sums the `tensor` axis's partial down-projections (each tensor rank
holds moe_intermediate / tensor columns of every local expert). Why psum rather than an
all-to-all: docs/parallelism.md.

Parameters (logical axes in brackets, see sharding/rules.py):
  router     [embed, router_experts]          replicated: every device routes every token
  gate_proj  [expert, embed, moe_mlp]
  up_proj    [expert, embed, moe_mlp]
  down_proj  [expert, moe_mlp, embed]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.models.quant import block_axis, dequantize


def route(x: jax.Array, router: jax.Array, top_k: int,
          normalize: bool) -> tuple[jax.Array, jax.Array]:
    """x [T, E] -> (weights [T, k] float32, expert ids [T, k] int32), best first."""
    logits = jnp.einsum("TE,EX->TX", x, router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def experts_forward(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array,
                    up: jax.Array, down: jax.Array, first_expert: jax.Array | int = 0,
                    gate_scale=None, up_scale=None, down_scale=None):
    """Sum over each token's routed experts held here of weight * expert(x).

    x [T, E]; weights, experts [T, k]; gate/up [n, E, F], down [n, F, E] hold experts
    first_expert .. first_expert + n - 1. Pairs routed elsewhere add nothing. Quantized
    weights (models/quant.py) come with scales [n, F] (gate, up) and [n, E] (down): each
    row's product is scaled by its own expert's scales.
    """
    num_tokens, k = experts.shape
    n = gate.shape[0]
    local = experts.reshape(-1) - first_expert
    mine = (local >= 0) & (local < n)
    key = jnp.where(mine, local, n)  # other devices' experts sort last, outside every group
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.sum(key[:, None] == jnp.arange(n), axis=0, dtype=jnp.int32)
    token = order // k
    xs = x[token]  # [T*k, E], grouped by expert
    row_expert = jnp.minimum(key[order], n - 1)  # rows of other experts are masked below

    def matmul(a, w, scale):
        if scale is None:
            return grouped_matmul(a, w, group_sizes)
        if block_axis(w.shape, scale.shape) is not None:  # q8_0
            return grouped_matmul(a, dequantize(w, scale).astype(a.dtype), group_sizes)
        y = grouped_matmul(a, w.astype(a.dtype), group_sizes)
        return (y.astype(jnp.float32) * scale[row_expert]).astype(a.dtype)

    h = nn.silu(matmul(xs, gate, gate_scale)) * matmul(xs, up, up_scale)
    y = matmul(h.astype(x.dtype), down, down_scale)
    scale = jnp.where(mine[order], weights.reshape(-1)[order], 0.0)
    y = jnp.where(mine[order][:, None], y, 0) * scale[:, None].astype(y.dtype)
    return jnp.zeros((num_tokens, x.shape[1]), y.dtype).at[token].add(y).astype(x.dtype)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] with rows grouped by expert, w [G, K, N] -> [M, N]: group g's rows times w[g].
    Rows past the last group are undefined (the caller masks them)."""
    m, k = x.shape
    n = w.shape[2]
    if not (_on_hopper() and x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16)
            and m % 64 == 0 and k % 64 == 0 and n % 128 == 0):
        return jax.lax.ragged_dot(x, w, group_sizes)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    # the fastest measured tilings: 256-wide column blocks once there are 256+ rows
    wide = m >= 256 and n % 256 == 0
    return ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=group_sizes, block_m=64, block_k=64, max_concurrent_steps=4,
        block_n=256 if wide else 128, grid_block_n=1 if wide or n % 256 else 2)


def _on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and any(h in device.device_kind for h in ("H100", "H200"))


def moe_forward(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array,
                down: jax.Array, *, top_k: int, normalize: bool, expert_axis: str | None,
                **scales) -> tuple[jax.Array, jax.Array]:
    """(this device's partial MoE output for x [T, E], summed over the mesh by the caller;
    the routed expert ids [T, k]). scales: gate_scale, up_scale, down_scale of quantized
    experts."""
    weights, experts = route(x, router, top_k, normalize)
    first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * gate.shape[0]
    return experts_forward(x, weights, experts, gate, up, down, first, **scales), experts


def moe_params(module: nn.Module, param, linear, config, num_local: int, dtype,
               stack: tuple[int, str] | None = None) -> dict:
    """Declare MoE parameters on `module` (param, linear: llama._param, llama._linear);
    `stack` = (n, axis name) stacks n blocks on a leading axis (the MoE layers of a model
    that mixes in dense ones). Experts follow config.quantization; the router never does."""
    e, f = config.hidden_size, config.moe_intermediate_size
    lead, names = ((stack[0],), (stack[1],)) if stack else ((), ())
    w = {"router": param(module, "router", (*lead, e, config.num_experts),
                         (*names, "embed", "router_experts"), dtype)}
    for key, shape, axes in (("gate", (num_local, e, f), ("expert", "embed", "moe_mlp")),
                             ("up", (num_local, e, f), ("expert", "embed", "moe_mlp")),
                             ("down", (num_local, f, e), ("expert", "moe_mlp", "embed"))):
        # the scale keeps the expert axis: one per expert and output channel
        w[key], scale = linear(module, f"{key}_proj", (*lead, *shape), (*names, *axes), dtype,
                               axes[1:2], config.quantization)
        if scale is not None:
            w[f"{key}_scale"] = scale
    return w
