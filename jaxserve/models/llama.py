"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2, Mixtral, Qwen3-MoE) in Linen.

One call runs a ragged batch: the tokens of many sequences packed on one axis, each
sequence contributing a prefill chunk or a single decode token. K/V of the new tokens
are scattered into the paged cache, then attention reads the pages. Layers run under
`nn.scan`, so parameters are stacked on a leading `layers` axis and the cache is a
carried buffer that XLA updates in place.

Parameter tree under "params" (logical axis names in brackets; see sharding/rules.py):
  embedding                        [vocab, embed]
  layers/attn_norm/scale           [layers, embed]
  layers/attn/{q,k,v}_proj/kernel  [layers, embed, heads|kv_heads, head_dim]
  layers/attn/{q,k,v}_proj/bias    [layers, heads|kv_heads, head_dim]  (attention_bias only)
  layers/attn/{q,k}_norm/scale     [layers, head_dim]                  (qk_norm only)
  layers/attn/o_proj               [layers, heads, head_dim, embed]
  layers/mlp_norm/scale            [layers, embed]
  layers/mlp/{gate,up}_proj        [layers, embed, mlp]                (dense models)
  layers/mlp/down_proj             [layers, mlp, embed]
  layers/moe/...                   [layers, ...] see models/moe.py     (MoE models)
  final_norm/scale                 [embed]
  lm_head                          [embed, vocab]                      (untied only)
`param_specs(config)` lists them with shapes; converters fill exactly that table. At load,
`runner.layer_arrays` splits the stacks into `layers_{i}/...` arrays (split_layers), and
each layer's q/k/v then become one `attn/qkv_proj` [embed, heads + 2 kv_heads, head_dim]
(fuse_qkv; under tensor parallelism joined shard by shard), and a dense MLP's gate and up
one `mlp/gate_up_proj` [embed, 2, mlp] (fuse_gate_up): one GEMM each instead of three and
two. Per-layer arrays run unrolled, or with `runner.layer_loop` in one loop body whose
matmuls pick their layer's weight (models/layer_select.py). `runner.transposed_weights`
then stores each layer's linear weights outputs-first, [outputs..., inputs...]
(transpose_weights; models/transposed.py), for XLA's CPU matmuls.

A model that mixes dense and MoE layers (Qwen3-MoE with `mlp_only_layers` or a
`decoder_sparse_step`) cannot stack both MLP kinds on one layer axis. Its MLP weights are
stacked per kind instead, outside the layer scan: `dense_mlp/*` [dense_layers, ...] and
`moe/*` [moe_layers, ...]. Each scanned layer picks its kind and row with `lax.cond`.
`ffn_param(config, role, layer)` says where a layer's MLP tensor goes.

Tensor parallelism (sharding/tensor.py): under `jax.shard_map` the model is built from the
per-device config (heads, KV heads, MLP columns and vocabulary divided over the `tensor`
axis) with `tensor_axis` naming that axis. It then sums o_proj's and down_proj's partial
outputs across the axis (one all-reduce each), looks up the embedding in its vocabulary
slice (one all-reduce) and gathers the LM head's vocabulary slices. Attention and the KV
write touch only the device's own KV heads. With `expert_axis`, each device holds
num_experts / expert_shards experts of every MoE layer (models/moe.py); the MLP's partial
outputs are summed over the tensor and expert axes in one all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.models.layer_select import LayerSelect, is_matmul_weight, layer_params
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.moe import moe_forward, moe_params
from jaxserve.models.q8_0_tiles import TILE_AXIS, Tiled, tile, tile_width_of, tiled_shapes
from jaxserve.models.quant import (
    ACTIVATION_ROWS,
    BLOCKS,
    SCALE,
    STORAGE,
    block_axis,
    dequantize,
    hadamard,
    kv_mode,
    qeinsum,
    quantize_vectors,
    scale_spec,
)
from jaxserve.models.rope import apply_rope, inverse_frequencies
from jaxserve.models.transposed import Transposed, transposed_einsum, transposed_shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens sit. All int32; padded to the step's bucket."""

    positions: jax.Array  # [T] absolute position of each token
    slot_mapping: jax.Array  # [T] page * page_size + offset to write its K/V (padding: slot 0)
    page_tables: jax.Array  # [S, P] page ids per sequence
    seq_lens: jax.Array  # [S] context length including this step's tokens (padding: 0)
    query_start: jax.Array  # [S + 1] cumulative query lengths


# attention_fn(q, k_pages, v_pages, layer, page_tables, seq_lens, query_start, *, sm_scale);
# one with a true `takes_new_kv` attribute also gets this step's K/V rows as k_new, v_new.
# One with a `rope_kv_writer` attribute has it apply RoPE and write the K/V rows, in place of
# the model's own ops, where q/k/v are joined (fuse_qkv) and there is no qk_norm or
# kv_rotation: rope_kv_writer(qkv, positions, inv_freq, k_pages, v_pages, layer,
# slot_mapping, num_heads=[, k_scales=, v_scales=]) -> (q, k_pages, v_pages[, k_scales,
# v_scales]), the scales for int8/fp8 pages. Per-layer weight arrays only: Flax's layer
# scan cannot trace a Pallas call that writes its carry.
AttentionFn = Callable[..., jax.Array]

_init = nn.initializers.normal(stddev=0.02)


def _sum_over(x, axis):
    """The all-reduce after a row-parallel projection (nothing without parallelism)."""
    return x if not axis else jax.lax.psum(x, axis)


def _param(module, name, shape, names, dtype, init=_init):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _linear(module, name, shape, names, dtype, contracted: tuple[str, ...], mode: str,
            transposed: bool = False, quantized_activations: bool = False,
            q8_0_tiles: bool = False, cpu_matmul: bool = False):
    """A linear layer's weight and, quantized (models/quant.py), its scale, which has the
    weight's axes less the `contracted` ones: (weight, scale or None). `shape` and `names`
    list the contracted axes first. With `transposed` (runner.transposed_weights) the weight
    is stored outputs-first and comes back as a Transposed (models/transposed.py); q8_0
    weights keep their layout (their scales run along the inputs). `quantized_activations`
    (runner.fp8_activations, runner.int8_activations): 8-bit weights outputs-first multiply
    activations quantized to their format in programs of ACTIVATION_ROWS[mode] tokens or
    more. `q8_0_tiles` (runner.q8_0_tiles): a q8_0 weight whose outputs tile is stored in
    column tiles, with its scale, and comes back as a Tiled (models/q8_0_tiles.py).
    `cpu_matmul` (runner.cpu_kernels): a float32 weight stored outputs-first is multiplied by
    pallas_kernels/cpu_matmul.py at 1-16 rows (models/transposed.py)."""
    c = len(contracted)
    block_n = tile_width_of(shape, c) if q8_0_tiles and mode == "q8_0" \
        and names[:c] == contracted else None
    if block_n:
        w_shape, s_shape = tiled_shapes(shape, c, block_n)
        w = _param(module, name, w_shape, (names[c], names[0], TILE_AXIS), STORAGE[mode],
                   nn.initializers.zeros)
        scale = _param(module, name + SCALE, s_shape, (names[c], names[c - 1] + BLOCKS, TILE_AXIS),
                       jnp.float32, nn.initializers.ones)
        return Tiled(w, tuple(shape), c), scale
    stored = transposed and mode != "q8_0"
    if stored and names[:len(contracted)] != contracted:
        raise ValueError(f"{name}: a transposed weight needs its contracted axes {contracted} "
                         f"first (got {names})")
    rows = ACTIVATION_ROWS.get(mode, 0) if quantized_activations else 0
    wrap = (lambda w: Transposed(w, len(contracted), rows, cpu_matmul)) if stored \
        else (lambda w: w)
    w_shape, w_names = ((transposed_shape(shape, len(contracted)),
                         transposed_shape(names, len(contracted))) if stored else (shape, names))
    if mode == "none":
        return wrap(_param(module, name, w_shape, w_names, dtype)), None
    w = _param(module, name, w_shape, w_names, STORAGE[mode], nn.initializers.zeros)
    scale = _param(module, name + SCALE, *scale_spec(names, shape, contracted, mode), jnp.float32,
                   nn.initializers.ones)
    return wrap(w), scale


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    axis: str = "embed"  # the logical name of the normalised axis

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), (self.axis,), self.dtype,
                       nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Projection(nn.Module):
    """x[T, E] -> [T, N, D] with an optional bias, via einsum on a named kernel."""

    num_heads: int
    head_dim: int
    head_axis: str
    use_bias: bool
    dtype: jnp.dtype
    quantization: str = "none"
    transposed: bool = False  # the kernel stored outputs-first (runner.transposed_weights)
    quantized_activations: bool = False  # runner.fp8_/int8_activations (see _linear)
    q8_0_tiles: bool = False  # runner.q8_0_tiles (see _linear)
    cpu_matmul: bool = False  # runner.cpu_kernels (see _linear)

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1], self.num_heads, self.head_dim)
        kernel, scale = _linear(self, "kernel", shape, ("embed", self.head_axis, "head_dim"),
                                self.dtype, ("embed",), self.quantization, self.transposed,
                                self.quantized_activations, self.q8_0_tiles, self.cpu_matmul)
        y = qeinsum("TE,ENH->TNH", x, kernel, scale)
        if self.use_bias:
            bias = _param(self, "bias", shape[1:], (self.head_axis, "head_dim"), self.dtype,
                          nn.initializers.zeros)
            y = y + bias
        return y


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention_fn: AttentionFn
    tensor_axis: str | None = None
    kv_rotation: bool = False  # cache.kv_rotation: Q, K, V rotated, the output back
    fused_qkv: bool = False  # one qkv_proj weight (fuse_qkv), not three
    transposed: bool = False  # linear weights stored outputs-first (transpose_weights)
    quantized_activations: bool = False  # runner.fp8_/int8_activations (see _linear)
    q8_0_tiles: bool = False  # runner.q8_0_tiles (see _linear)
    cpu_matmul: bool = False  # runner.cpu_kernels (see _linear)

    @nn.compact
    def __call__(self, x, kv, layer, meta: AttentionMetadata):
        c = self.config
        proj = lambda name, n, axis: Projection(n, c.head_dim, axis, c.attention_bias,
                                                self.dtype, c.quantization, self.transposed,
                                                self.quantized_activations, self.q8_0_tiles,
                                                self.cpu_matmul, name=name)(x)
        if self.fused_qkv:
            h, kvh = c.num_heads, c.num_kv_heads
            qkv = proj("qkv_proj", h + 2 * kvh, "heads")  # [T, H + 2K, D]
            q, k, v = qkv[:, :h], qkv[:, h:h + kvh], qkv[:, h + kvh:]
        else:
            q = proj("q_proj", c.num_heads, "heads")  # [T, H, D]
            k = proj("k_proj", c.num_kv_heads, "kv_heads")  # [T, K, D]
            v = proj("v_proj", c.num_kv_heads, "kv_heads")
        inv_freq = jnp.asarray(inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling))
        pos = jnp.maximum(meta.positions, 0)
        if self.kv_rotation:  # q.k and the weights of v are unchanged by an orthonormal H
            rot = jnp.asarray(hadamard(c.head_dim))
            turn = lambda t: jnp.einsum("thd,de->the", t.astype(jnp.float32), rot).astype(t.dtype)
        k_pages, v_pages, *scales = kv  # [L, N, page_size, K, D] (+ scales [L, N, page_size, K])
        extra, new_kv = {}, {}
        takes_new_kv = getattr(self.attention_fn, "takes_new_kv", False)
        writer = getattr(self.attention_fn, "rope_kv_writer", None)
        if (writer is not None and self.fused_qkv and not c.qk_norm and not self.kv_rotation
                and not (takes_new_kv and scales)):
            # one kernel: RoPE on q and k, and the K/V rows (quantized: and scales) written;
            # for an attention that takes this step's K/V rows (unquantized pages), the
            # rotated k rows too
            named = lambda s: dict(zip(("k_scales", "v_scales"), s, strict=True)) if s else {}
            q, k_pages, v_pages, *scales = writer(
                qkv, pos, inv_freq, k_pages, v_pages, layer, meta.slot_mapping,
                num_heads=c.num_heads, new_k=takes_new_kv, **named(scales))
            if takes_new_kv:
                new_kv = dict(k_new=scales.pop(), v_new=v)
            extra = named(scales)
        else:
            if c.qk_norm:  # Qwen3: RMSNorm over each head's vector, before RoPE
                q = RMSNorm(c.rms_norm_eps, self.dtype, "head_dim", name="q_norm")(q)
                k = RMSNorm(c.rms_norm_eps, self.dtype, "head_dim", name="k_norm")(k)
            q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
            if self.kv_rotation:
                q, k, v = turn(q), turn(k), turn(v)
            page_size = k_pages.shape[2]
            page, offset = meta.slot_mapping // page_size, meta.slot_mapping % page_size
            if takes_new_kv:
                new_kv = dict(k_new=k, v_new=v)
            if scales:  # a quantized cache: one scale per (token, KV head)
                mode = kv_mode(k_pages.dtype)
                (k, k_scale), (v, v_scale) = quantize_vectors(k, mode), quantize_vectors(v, mode)
                if takes_new_kv:  # the rows as the pages hold them, as every other row reads
                    new_kv = dict(k_new=dequantize(k, k_scale, (2,)),
                                  v_new=dequantize(v, v_scale, (2,)))
                extra = dict(k_scales=scales[0].at[layer, page, offset].set(k_scale),
                             v_scales=scales[1].at[layer, page, offset].set(v_scale))
            k_pages = k_pages.at[layer, page, offset].set(k.astype(k_pages.dtype))
            v_pages = v_pages.at[layer, page, offset].set(v.astype(v_pages.dtype))

        out = self.attention_fn(
            q, k_pages, v_pages, layer, meta.page_tables, meta.seq_lens, meta.query_start,
            sm_scale=c.head_dim**-0.5, **extra, **new_kv,
        )  # [T, H, D]
        if self.kv_rotation:  # H is symmetric and orthonormal: its own inverse
            out = turn(out)
        o_kernel, o_scale = _linear(self, "o_proj", (c.num_heads, c.head_dim, c.hidden_size),
                                    ("heads", "head_dim", "embed"), self.dtype,
                                    ("heads", "head_dim"), c.quantization, self.transposed,
                                    self.quantized_activations, self.q8_0_tiles,
                                    self.cpu_matmul)
        out = out.astype(self.dtype)
        if isinstance(o_kernel, LayerSelect) and (
                o_scale is None or block_axis(o_kernel.shape, o_scale.shape) is None):
            # heads and head_dim as one contracted axis: with two, XLA's CPU layouts copied
            # the weight transposed before every matmul (the layer loop's own program; the
            # other layouts keep their sums as they were)
            o = o_kernel.apply(lambda w, out, s: qeinsum(
                "TK,KE->TE", out.reshape(out.shape[0], -1), w.reshape(-1, w.shape[-1]), s),
                out, o_scale)
        else:
            o = qeinsum("TNH,NHE->TE", out, o_kernel, o_scale)
        return _sum_over(o, self.tensor_axis), (k_pages, v_pages, *extra.values())


def mlp_forward(x, gate=None, up=None, down=None, gate_scale=None, up_scale=None,
                down_scale=None, gate_up=None, gate_up_scale=None, swiglu=None):
    """SwiGLU MLP: x [T, E] -> [T, E] (this device's partial sum under tensor parallelism);
    the scales of quantized weights (models/quant.py), if any. gate_up [E, 2, F] (with its
    scale) stands for gate and up joined (fuse_gate_up). swiglu(x, gate_up): a kernel that
    gives silu(x Wg) * (x Wu) itself, or None where it does not take these operands
    (pallas_kernels/swiglu_matmul_mgpu.py, `PrefillSwiglu`)."""
    if gate_up is not None:
        h = swiglu(x, gate_up) if swiglu is not None and gate_up_scale is None else None
        if h is None:
            both = qeinsum("TE,EGF->TGF", x, gate_up, gate_up_scale)
            h = nn.silu(both[:, 0]) * both[:, 1]
    else:
        h = (nn.silu(qeinsum("TE,EF->TF", x, gate, gate_scale))
             * qeinsum("TE,EF->TF", x, up, up_scale))
    return qeinsum("TF,FE->TE", h, down, down_scale)


def _mlp_params(module, config, dtype, stack: tuple[int, str] | None = None,
                quantization: str = "none", fused: bool = False,
                transposed: bool = False, quantized_activations: bool = False,
                q8_0_tiles: bool = False, cpu_matmul: bool = False) -> dict:
    e, f = config.hidden_size, config.intermediate_size
    lead, names = ((stack[0],), (stack[1],)) if stack else ((), ())
    w = {}
    inputs = ((("gate_up", (e, 2, f), ("embed", "gate_up", "mlp")),) if fused else
              (("gate", (e, f), ("embed", "mlp")), ("up", (e, f), ("embed", "mlp"))))
    for key, shape, axes in (*inputs, ("down", (f, e), ("mlp", "embed"))):
        w[key], scale = _linear(module, f"{key}_proj", (*lead, *shape), (*names, *axes), dtype,
                                axes[:1], quantization, transposed, quantized_activations,
                                q8_0_tiles and not stack, cpu_matmul)
        if scale is not None:
            w[f"{key}_scale"] = scale
    return w


@dataclasses.dataclass(frozen=True)
class Parallel:
    """The mesh axes a per-device model sums over (None: not split over that axis)."""

    tensor_axis: str | None = None
    expert_axis: str | None = None
    expert_shards: int = 1  # devices on the expert axis; each holds num_experts / this

    @property
    def mlp_axes(self) -> tuple[str, ...]:
        return tuple(a for a in (self.tensor_axis, self.expert_axis) if a)


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    parallel: Parallel = Parallel()
    fused_gate_up: bool = False  # one gate_up_proj weight (fuse_gate_up), not two
    transposed: bool = False  # weights stored outputs-first (transpose_weights)
    quantized_activations: bool = False  # runner.fp8_/int8_activations (see _linear)
    q8_0_tiles: bool = False  # runner.q8_0_tiles (see _linear)
    cpu_matmul: bool = False  # runner.cpu_kernels (see _linear)
    swiglu: Callable | None = None  # gate/up with SwiGLU by a kernel (see mlp_forward)

    @nn.compact
    def __call__(self, x):
        w = _mlp_params(self, self.config, self.dtype, quantization=self.config.quantization,
                        fused=self.fused_gate_up, transposed=self.transposed,
                        quantized_activations=self.quantized_activations,
                        q8_0_tiles=self.q8_0_tiles, cpu_matmul=self.cpu_matmul)
        return _sum_over(mlp_forward(x, **w, swiglu=self.swiglu), self.parallel.tensor_axis)


class MoE(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    parallel: Parallel = Parallel()

    @nn.compact
    def __call__(self, x):
        c, par = self.config, self.parallel
        w = moe_params(self, _param, _linear, c, c.num_experts // par.expert_shards, self.dtype)
        y, experts = _moe(c, par, x, w)
        return _sum_over(y, par.mlp_axes), experts


def _moe(config: ModelConfig, parallel: Parallel, x, weights: dict):
    """One MoE block on this device's experts: (partial output, routed experts [T, k])."""
    return moe_forward(x, **weights, top_k=config.num_experts_per_tok,
                       normalize=config.norm_topk_prob, expert_axis=parallel.expert_axis)


def _ffn_rows(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: whether its MLP is MoE, and its row in the stack of its kind (the layers
    of each kind in order; see the module docstring)."""
    is_moe = np.isin(np.arange(config.num_layers), config.moe_layers)
    rows = np.zeros(config.num_layers, np.int32)
    rows[is_moe] = np.arange(is_moe.sum())
    rows[~is_moe] = np.arange((~is_moe).sum())
    return is_moe, rows


def _mixed_ffn(config: ModelConfig, parallel: Parallel, x, layer, stacks: dict):
    """The MLP of `layer` in a model that mixes dense and MoE layers (see the docstring),
    and its routed experts ([T, k]; -1 on a dense layer)."""
    c = config
    is_moe, rows = _ffn_rows(c)
    row = jnp.asarray(rows)[layer]
    pick = lambda tree: jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, row, keepdims=False), tree)

    def moe():
        return _moe(c, parallel, x, pick(stacks["moe"]))

    def dense():
        y = mlp_forward(x, **pick(stacks["mlp"]))
        if parallel.expert_axis is not None:
            # replicated over the expert axis: one rank's copy enters the shared all-reduce
            y = jnp.where(jax.lax.axis_index(parallel.expert_axis) == 0, y, jnp.zeros_like(y))
        return y, jnp.full((x.shape[0], c.num_experts_per_tok), -1, jnp.int32)

    y, experts = jax.lax.cond(jnp.asarray(is_moe)[layer], moe, dense)
    return _sum_over(y, parallel.mlp_axes), experts


class _FFNStack(nn.Module):
    """One kind's MLP weights, stacked over the layers of that kind (mixed models)."""

    config: ModelConfig
    dtype: jnp.dtype
    kind: str  # "dense" | "moe"
    expert_shards: int

    @nn.compact
    def __call__(self) -> dict:
        c = self.config
        if self.kind == "moe":
            return moe_params(self, _param, _linear, c, c.num_experts // self.expert_shards,
                              self.dtype, (len(c.moe_layers), "moe_layers"))
        return _mlp_params(self, c, self.dtype, (len(c.dense_layers), "dense_layers"),
                           c.quantization)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    attention_fn: AttentionFn
    parallel: Parallel = Parallel()
    kv_rotation: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    transposed: bool = False
    quantized_activations: bool = False
    q8_0_tiles: bool = False
    cpu_matmul: bool = False
    swiglu: Callable | None = None

    @nn.compact
    def __call__(self, carry, layer, meta, ffn_stacks=None):
        x, kv = carry
        c, par = self.config, self.parallel
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x)
        a, kv = Attention(c, self.dtype, self.attention_fn, par.tensor_axis, self.kv_rotation,
                          self.fused_qkv, self.transposed, self.quantized_activations,
                          self.q8_0_tiles, self.cpu_matmul, name="attn")(h, kv, layer, meta)
        x = x + a
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="mlp_norm")(x)
        if c.is_mixed:
            y, experts = _mixed_ffn(c, par, h, layer, ffn_stacks)
        elif c.is_moe:
            y, experts = MoE(c, self.dtype, par, name="moe")(h)
        else:
            y, experts = MLP(c, self.dtype, par, self.fused_gate_up, self.transposed,
                             self.quantized_activations, self.q8_0_tiles, self.cpu_matmul,
                             swiglu=self.swiglu, name="mlp")(h), None
        if experts is not None:  # kept only when asked: apply(..., mutable="intermediates")
            self.sow("intermediates", "routed_experts", experts)
        return (x + y, kv), None


class LlamaModel(nn.Module):
    """tokens [T] + KV pages -> logits at `logits_indices` [S, vocab] (float32) + new pages.

    With `tensor_axis`, `config` holds one device's shapes (see the module docstring) and the
    logits still cover the whole vocabulary.
    """

    config: ModelConfig
    dtype: jnp.dtype
    attention_fn: AttentionFn
    scan_unroll: int = 1  # layers per while-loop iteration (num_layers: fully unrolled)
    tensor_axis: str | None = None
    expert_axis: str | None = None
    expert_shards: int = 1
    kv_rotation: bool = False  # cache.kv_rotation (a quantized cache's vectors rotated)
    layer_arrays: bool = False  # params hold "layers_0".. (split_layers), not stacked "layers"
    fused_qkv: bool = False  # each layer's q/k/v as one weight (fuse_qkv)
    fused_gate_up: bool = False  # each dense MLP's gate/up as one weight (fuse_gate_up)
    layer_loop: bool = False  # with layer_arrays: one loop body for every layer (layer_select)
    transposed: bool = False  # linear weights stored outputs-first (transpose_weights)
    quantized_activations: bool = False  # runner.fp8_/int8_activations (see _linear)
    q8_0_tiles: bool = False  # with layer_arrays: q8_0 weights in column tiles (tile_q8_0)
    # with transposed: float32 matmuls of 1-16 rows, the tied LM head's too, by
    # pallas_kernels/cpu_matmul.py (runner.cpu_kernels)
    cpu_matmul: bool = False
    # with layer_arrays: each dense MLP's gate/up product and SwiGLU by a kernel where it takes
    # them (mlp_forward; the runner's choice: runner.pick_swiglu)
    swiglu: Callable | None = None

    def setup(self):
        c = self.config
        par = Parallel(self.tensor_axis, self.expert_axis, self.expert_shards)
        self.embedding = _param(self, "embedding", (c.vocab_size, c.hidden_size),
                                ("vocab", "embed"), self.dtype)
        if self.layer_arrays:  # one module per layer: params "layers_0", "layers_1", ...
            if c.is_mixed:
                raise ValueError("layer_arrays: models mixing dense and MoE layers keep stacks")
            if self.layer_loop and c.is_moe:
                raise ValueError("layer_loop: MoE layers are not run by one loop body")
            self.layers = [DecoderLayer(c, self.dtype, self.attention_fn, par, self.kv_rotation,
                                        self.fused_qkv, self.fused_gate_up, self.transposed,
                                        self.quantized_activations, self.q8_0_tiles,
                                        self.cpu_matmul, swiglu=self.swiglu)
                           for _ in range(c.num_layers)]
        else:
            self.layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                unroll=self.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.attention_fn, par, self.kv_rotation, self.fused_qkv,
              self.fused_gate_up)
        if c.is_mixed:  # MLP weights stacked per kind, outside the scan
            self.dense_mlp = _FFNStack(c, self.dtype, "dense", 1)
            self.moe = _FFNStack(c, self.dtype, "moe", self.expert_shards)
        self.final_norm = RMSNorm(c.rms_norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", (c.hidden_size, c.vocab_size),
                                  ("embed", "vocab"), self.dtype)

    def __call__(self, tokens, kv, meta: AttentionMetadata, logits_indices):
        x, kv = self.decode(self.embed(tokens), kv, meta)
        return self.logits(x, logits_indices), kv

    def embed(self, tokens):
        """tokens [T] -> x [T, embed]."""
        return self._embed(self.embedding, tokens)

    def decode(self, x, kv, meta: AttentionMetadata):
        """x [T, embed] through every layer this model holds; K/V written into `kv`."""
        if self.layer_arrays and self.layer_loop and not self.is_initializing():
            return self._layer_loop(x, kv, meta)
        if self.layer_arrays:
            for i, layer in enumerate(self.layers):
                (x, kv), _ = layer((x, kv), jnp.int32(i), meta)
            return x, kv
        layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        stacks = {"mlp": self.dense_mlp(), "moe": self.moe()} if self.config.is_mixed else None
        (x, kv), _ = self.layers((x, kv), layers, meta, stacks)
        return x, kv

    def _layer_loop(self, x, kv, meta: AttentionMetadata):
        """The per-layer arrays' layers as one loop body: each matmul picks its layer's
        weight by lax.switch (models/layer_select.py), so no weight is copied and the layer
        is compiled once, not once per layer."""
        params = self.variables["params"]
        per_layer = [params[f"layers_{i}"] for i in range(self.config.num_layers)]
        layer = self.layers[0].clone(parent=None, name=None)

        def body(i, carry):
            carry, _ = layer.apply({"params": layer_params(per_layer, i)}, carry, i, meta)
            return carry

        return jax.lax.fori_loop(0, self.config.num_layers, body, (x, kv))

    def logits(self, x, logits_indices):
        """Float32 logits [S, vocab] of the rows `logits_indices` of x [T, embed]."""
        x = self.final_norm(x[logits_indices])
        if self.config.tie_word_embeddings and self.transposed:  # [vocab, embed]: outputs-first
            logits = transposed_einsum("SE,EV->SV", x,
                                       Transposed(self.embedding, 1, cpu_kernel=self.cpu_matmul),
                                       preferred_element_type=jnp.float32)
        elif self.config.tie_word_embeddings:
            logits = jnp.einsum("SE,VE->SV", x, self.embedding,
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("SE,EV->SV", x, self.lm_head, preferred_element_type=jnp.float32)
        if self.tensor_axis is not None:  # [S, vocab / tp] slices -> [S, vocab]
            logits = jax.lax.all_gather(logits, self.tensor_axis, axis=1, tiled=True)
        return logits

    def _embed(self, embedding, tokens):
        """Rows of the embedding; under tensor parallelism each device holds a vocab slice."""
        if self.tensor_axis is None:
            return jnp.take(embedding, tokens, axis=0)
        rows = embedding.shape[0]
        local = tokens - jax.lax.axis_index(self.tensor_axis) * rows
        mine = (local >= 0) & (local < rows)
        x = jnp.take(embedding, jnp.clip(local, 0, rows - 1), axis=0)
        return jax.lax.psum(jnp.where(mine[:, None], x, 0), self.tensor_axis)


def param_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Flat '/'-joined parameter path -> (shape, logical axis names), from the model itself."""
    meta = _dummy_inputs(config, num_tokens=1, num_seqs=1, pages_per_seq=1)
    model = LlamaModel(config, jnp.float32, _no_attention)
    abstract = jax.eval_shape(model.init, jax.random.key(0), *meta)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {
        "/".join(k.key for k in path): (tuple(leaf.value.shape), tuple(leaf.names))
        for path, leaf in leaves
    }


def ffn_param(config: ModelConfig, name: str, layer: int) -> tuple[str, int]:
    """(param path, row on its stacked axis) of layer `layer`'s MLP tensor `name`
    (`gate_proj`, `up_proj`, `down_proj` of a dense MLP; `router`, `experts/gate_proj`, ...
    of an MoE block)."""
    moe = name == "router" or name.startswith("experts/")
    leaf = name.removeprefix("experts/")
    if not config.is_mixed:
        return f"layers/{'moe' if moe else 'mlp'}/{leaf}", layer
    is_moe, rows = _ffn_rows(config)
    if not 0 <= layer < config.num_layers or is_moe[layer] != moe:
        raise ValueError(f"layer {layer} has no {'MoE' if moe else 'dense'} MLP")
    return f"{'moe' if moe else 'dense_mlp'}/{leaf}", int(rows[layer])


def nest_params(flat: dict) -> dict:
    """{'layers/attn/o_proj': x, ...} (param_specs paths) -> the nested "params" tree."""
    return traverse_util.unflatten_dict(flat, sep="/")


def split_layers(flat: dict, num_layers: int) -> dict:
    """Flat params with stacked `layers/...` [L, ...] -> `layers_{i}/...` [...] (the tree of
    LlamaModel(layer_arrays=True)). Sharded arrays keep their sharding less the layer axis,
    and each stacked array is deleted once split (the caller gives `flat` up), so the
    weights never exist twice."""
    out = {}
    for path, value in flat.items():
        if not path.startswith("layers/"):
            out[path] = value
            continue
        rest = path.removeprefix("layers/")
        if isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding):
            spec = tuple(value.sharding.spec)[1:]
            sharding = NamedSharding(value.sharding.mesh, PartitionSpec(*spec))
            parts = jax.jit(lambda a: tuple(a[i] for i in range(num_layers)),
                            out_shardings=(sharding,) * num_layers)(value)
            value.delete()  # one stack at a time: at most one layer array's worth more
        else:
            parts = tuple(value[i] for i in range(num_layers))
        for i, part in enumerate(parts):
            out[f"layers_{i}/{rest}"] = part
    return out


def has_layer_arrays(params: dict) -> bool:
    """Whether a params tree holds one entry per layer (split_layers), not stacks."""
    return "layers_0" in params


QKV = ("q_proj", "k_proj", "v_proj")


def fuse_qkv(flat: dict) -> dict:
    """Each layer's q/k/v weights -> one `attn/qkv_proj`: kernels [..., embed, H + 2K,
    head_dim] (and biases, quantization scales) concatenated on the heads axis, each trio
    deleted once joined; stacked `layers/...` or split `layers_{i}/...` alike. One GEMM then
    reads one contiguous weight (the 8B shape's q/k/v on an H200: 26 -> 18 us a layer at 128
    tokens, 20 -> 16 us at 32; docs/performance.md). Where the heads axis is split over n
    devices (mesh.tensor), the heads are joined shard by shard, [q_0 k_0 v_0 | q_1 k_1 v_1
    | ...], so that each device's slice of the joined axis is its own q, k and v heads, in
    the order the model splits them (`Attention`)."""
    return _join_each(flat, "attn", QKV, "qkv_proj", _qkv_join)


def _qkv_join(prefix: str, parts: tuple):
    """The jitted join of one layer's q/k/v parts (`_join_heads`), for the number of shards
    their heads axis is split in, which must be the same for every part."""
    shards = {_head_shards(part) for part in parts}
    if len(shards) != 1:
        raise ValueError(f"{prefix}: the heads of {', '.join(QKV)} are split in different "
                         f"numbers of shards ({sorted(shards)})")
    return _join_heads(_sharding_of(parts[0]), parts[0].ndim, shards.pop())


@functools.cache
def _join_heads(sharding, ndim: int, shards: int):
    """A jitted join: arrays [..., heads_i, head_dim], their heads axis split in `shards`
    equal shards -> [..., sum(heads_i), head_dim] holding shard 0's heads of every part,
    then shard 1's, and so on; placed as the first part (a layer axis split over pipeline
    stages stays split). One compile per shape."""
    axis = ndim - 2

    def join(parts):
        lead, dim = parts[0].shape[:axis], parts[0].shape[-1]
        split = [p.reshape(*lead, shards, p.shape[axis] // shards, dim) for p in parts]
        return jnp.concatenate(split, axis=axis + 1).reshape(*lead, -1, dim)

    return jax.jit(join, out_shardings=sharding)


def _head_shards(part) -> int:
    """How many shards a weight's heads axis (its second to last) is split in."""
    if not isinstance(part, jax.Array):
        return 1
    axis = part.ndim - 2
    return part.shape[axis] // part.sharding.shard_shape(part.shape)[axis]


def _sharding_of(part):
    """A weight's sharding (None for a host array)."""
    return part.sharding if isinstance(part, jax.Array) else None


def _join_each(flat: dict, group: str, names: tuple[str, ...], joined: str, join) -> dict:
    """Each layer's weights `{prefix}/{group}/{name}{rest}` (name in `names`; rest: a leaf
    such as `/kernel`, or `_scale`) -> one `{prefix}/{group}/{joined}{rest}`, made by
    join(f"{prefix}/{group}", parts)(parts); each part deleted once joined."""
    out = dict(flat)
    marker = f"/{group}/{names[0]}"
    for key in [k for k in flat if marker in k]:
        prefix, rest = key.split(marker)
        parts = tuple(out.pop(f"{prefix}/{group}/{name}{rest}") for name in names)
        out[f"{prefix}/{group}/{joined}{rest}"] = join(f"{prefix}/{group}", parts)(parts)
        for part in parts:
            if isinstance(part, jax.Array):
                part.delete()
    return out


def has_fused_qkv(params: dict) -> bool:
    """Whether a params tree holds joined q/k/v weights (fuse_qkv)."""
    layer = params.get("layers_0", params.get("layers", {}))
    return "qkv_proj" in layer.get("attn", {})


def fuse_gate_up(flat: dict) -> dict:
    """Each dense MLP's gate and up weights -> one `mlp/gate_up_proj` [..., embed, 2, mlp]
    (quantization scales [..., 2, mlp], q8_0's [..., embed_blocks, 2, mlp]), each pair
    deleted once joined; stacked or split layers alike. One GEMM then reads both, and its
    output holds gate's and up's columns side by side for the SwiGLU product. The mlp axis
    keeps its sharding (mesh.tensor): each device holds its own gate and up columns."""
    return _join_each(flat, "mlp", ("gate_proj", "up_proj"), "gate_up_proj",
                      lambda _, parts: _stack_halves(_sharding_of(parts[0]), parts[0].ndim))


@functools.cache
def _stack_halves(sharding, ndim: int):
    """Arrays [..., mlp] -> [..., 2, mlp], the new axis unsplit and the others placed as the
    first's; one compile per shape."""
    if isinstance(sharding, NamedSharding):
        spec = _full_spec(sharding, ndim)
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[:-1], None, spec[-1]))
    return jax.jit(lambda parts: jnp.stack(parts, axis=ndim - 1), out_shardings=sharding)


# Linear weights whose inputs are every axis but the last (the row-parallel projections);
# the others (q/k/v kernels, gate, up) have one input axis, the first: embed.
ROW_PARALLEL = ("o_proj", "down_proj")


def _layer_linear_weights(flat: dict):
    """(path, weight, its scale or None, how many of its leading axes are inputs) for each
    layer's linear weight in split_layers' `layers_{i}/...` tree."""
    for path, value in flat.items():
        names = tuple(path.split("/"))
        if not names[0].startswith("layers_") or not is_matmul_weight(names):
            continue
        name = names[-2] if names[-1] == "kernel" else names[-1]
        inputs = value.ndim - 1 if name in ROW_PARALLEL else 1
        yield path, value, flat.get(path + SCALE), inputs


def _full_spec(sharding: NamedSharding, ndim: int) -> tuple:
    """A NamedSharding's PartitionSpec with one entry per axis (the trailing ones None)."""
    return (*sharding.spec, *(None,) * (ndim - len(sharding.spec)))


def transpose_weights(flat: dict) -> dict:
    """Each layer's float, int8 or fp8 linear weight (split_layers' `layers_{i}/...`) ->
    stored outputs-first, [outputs..., inputs...] (models/transposed.py; the tree of
    LlamaModel(transposed=True)), each array deleted once transposed. A sharded weight keeps
    each axis split as it was. q8_0 weights (a `_scale` with the weight's rank) keep their
    layout, as the model declares them."""
    out = dict(flat)
    for path, value, scale, inputs in _layer_linear_weights(flat):
        if scale is not None and block_axis(value.shape, scale.shape) is not None:
            continue
        perm = transposed_shape(tuple(range(value.ndim)), inputs)
        sharding = _sharding_of(value)
        if isinstance(sharding, NamedSharding):
            spec = _full_spec(sharding, value.ndim)
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in perm)))
        out[path] = _transpose(sharding, perm)(value)
        if isinstance(value, jax.Array):
            value.delete()
    return out


def tile_q8_0(flat: dict) -> dict:
    """Each layer's q8_0 linear weight and its block scale (split_layers' `layers_{i}/...`)
    -> column tiles [N / BN, K, BN] (models/q8_0_tiles.py; the tree of
    LlamaModel(q8_0_tiles=True)), BN from the outputs one device holds; each array deleted
    once tiled. A weight split over outputs (column-parallel) is split over its tiles, one
    split over inputs (row-parallel) over K; a weight whose outputs do not tile keeps its
    layout, as the model declares it."""
    out = dict(flat)
    for path, value, scale, inputs in _layer_linear_weights(flat):
        if scale is None or block_axis(value.shape, scale.shape) is None:
            continue
        sharding = _sharding_of(value)
        local = sharding.shard_shape(value.shape) if sharding is not None else value.shape
        block_n = tile_width_of(local, inputs)
        if block_n is None:
            continue
        for key, array in ((path, value), (path + SCALE, scale)):
            out[key] = _tile(_tiled_sharding(array.sharding, array.ndim, inputs)
                             if isinstance(array, jax.Array) else None,
                             inputs, block_n)(array)
            if isinstance(array, jax.Array):
                array.delete()
    return out


def _tiled_sharding(sharding, ndim: int, inputs: int):
    """[K..., N...]'s NamedSharding -> its tiles' [N / BN, K, BN]: the outputs' split on the
    tiles, the inputs' on K. Only a group's first axis may be split (the flattened axis is
    then split into whole runs of it)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = _full_spec(sharding, ndim)
    ins, outs = spec[:inputs], spec[inputs:]
    if any(s is not None for s in (*ins[1:], *outs[1:])):
        raise ValueError(f"q8_0 tiles: a weight split as {spec} (only the first input and "
                         "output axes may be split)")
    return NamedSharding(sharding.mesh, PartitionSpec(outs[0], ins[0], None))


@functools.cache
def _tile(sharding, inputs: int, block_n: int):
    return jax.jit(lambda a: tile(a, inputs, block_n), out_shardings=sharding)


@functools.cache
def _transpose(sharding, perm: tuple[int, ...]):
    return jax.jit(lambda a: jnp.transpose(a, perm), out_shardings=sharding)


def has_fused_gate_up(params: dict) -> bool:
    """Whether a params tree holds joined gate/up weights (fuse_gate_up)."""
    layer = params.get("layers_0", params.get("layers", {}))
    return "gate_up_proj" in layer.get("mlp", {})


def flatten_params(tree: dict) -> dict:
    """The nested "params" tree -> {'layers/attn/o_proj': x, ...}."""
    return traverse_util.flatten_dict(tree, sep="/")


def _no_attention(q, *args, **kwargs):
    return q


def _dummy_inputs(config: ModelConfig, num_tokens: int, num_seqs: int, pages_per_seq: int):
    z = lambda *shape: jnp.zeros(shape, jnp.int32)
    meta = AttentionMetadata(z(num_tokens), z(num_tokens), z(num_seqs, pages_per_seq),
                             z(num_seqs), z(num_seqs + 1))
    kv_shape = (config.num_layers, 1, 1, config.num_kv_heads, config.head_dim)
    kv = (jnp.zeros(kv_shape, jnp.float32),) * 2
    return z(num_tokens), kv, meta, z(num_seqs)
