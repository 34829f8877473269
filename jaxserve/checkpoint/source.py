"""What a source checkpoint format (GGUF, HF safetensors) gives the Orbax writer.

A source yields our parameters one tensor at a time, already in our layout (see
jaxserve/models/llama.py), so the writer never holds more than one tensor in memory:
`(path, index, array)` where `path` is a `param_specs` key and `index` addresses the
leading stacked axes: None for unstacked parameters such as the embedding, the row on the
stacked layer axis, or (row, expert) for one expert of an MoE layer. An MoE tensor that
packs every expert of a layer comes as one item with index = row.

Both formats name tensors differently but store matrices the same way, HF `[out, in]`.
They map their names to the roles below and call `to_our_layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jaxserve.errors import CheckpointError
from jaxserve.models.llama import ffn_param
from jaxserve.models.model_config import ModelConfig

Index = int | tuple[int, int] | None
TensorItem = tuple[str, Index, np.ndarray]  # (param path, index, array)

DTYPES = ("float32", "bfloat16", "float16")


@runtime_checkable
class SourceCheckpoint(Protocol):
    path: Path  # the file or directory read
    config: ModelConfig
    default_dtype: str  # one of DTYPES: what the converter stores by default

    @property
    def num_tensors(self) -> int:
        """How many items `tensors()` yields."""
        ...

    def tensors(self) -> Iterator[TensorItem]:
        """Each parameter (each layer of a stacked one) exactly once, in our layout."""
        ...

    def write_tokenizer_assets(self, out_dir: Path) -> None:
        """Write what jaxserve.tokenizer needs to rebuild the tokenizer into out_dir."""
        ...


_Shape = Callable[[ModelConfig], tuple[int, ...]]
_Fn = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _heads(n: Callable[[ModelConfig], int]) -> tuple[_Shape, _Fn, _Shape, _Fn]:
    """Kernel and bias entries of a q/k/v projection with n(c) heads."""
    kernel_shape = lambda c: (n(c) * c.head_dim, c.hidden_size)
    kernel = lambda w, c: w.T.reshape(c.hidden_size, n(c), c.head_dim)  # [E, N, D]
    bias_shape = lambda c: (n(c) * c.head_dim,)
    bias = lambda w, c: w.reshape(n(c), c.head_dim)  # [N, D]
    return kernel_shape, kernel, bias_shape, bias


_same: _Fn = lambda w, c: w
_transpose: _Fn = lambda w, c: w.T
_q = _heads(lambda c: c.num_heads)
_kv = _heads(lambda c: c.num_kv_heads)

# role -> (our path, per layer?, HF [out, in] shape, HF -> ours)
_ROLES: dict[str, tuple[str, bool, _Shape, _Fn]] = {
    "embed_tokens": ("embedding", False, lambda c: (c.vocab_size, c.hidden_size), _same),
    "lm_head": ("lm_head", False, lambda c: (c.vocab_size, c.hidden_size), _transpose),
    "norm": ("final_norm/scale", False, lambda c: (c.hidden_size,), _same),
    "input_layernorm": ("layers/attn_norm/scale", True, lambda c: (c.hidden_size,), _same),
    "post_attention_layernorm": ("layers/mlp_norm/scale", True, lambda c: (c.hidden_size,),
                                 _same),
    "q_proj": ("layers/attn/q_proj/kernel", True, _q[0], _q[1]),
    "k_proj": ("layers/attn/k_proj/kernel", True, _kv[0], _kv[1]),
    "v_proj": ("layers/attn/v_proj/kernel", True, _kv[0], _kv[1]),
    "q_proj.bias": ("layers/attn/q_proj/bias", True, _q[2], _q[3]),
    "k_proj.bias": ("layers/attn/k_proj/bias", True, _kv[2], _kv[3]),
    "v_proj.bias": ("layers/attn/v_proj/bias", True, _kv[2], _kv[3]),
    "q_norm": ("layers/attn/q_norm/scale", True, lambda c: (c.head_dim,), _same),
    "k_norm": ("layers/attn/k_norm/scale", True, lambda c: (c.head_dim,), _same),
    "o_proj": ("layers/attn/o_proj", True,
               lambda c: (c.hidden_size, c.num_heads * c.head_dim),
               lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),  # [N, D, E]
}

# MLP roles, whose path depends on the layer (llama.ffn_param):
# role -> (our MLP tensor, HF shape, HF -> ours). "expert_*" roles are one expert of a layer;
# "experts_*" hold every expert of the layer, [experts, out, in] (GGUF, transformers 5).
_T: _Fn = lambda w, c: np.swapaxes(w, -1, -2)
_I = lambda c: c.moe_intermediate_size
_FFN: dict[str, tuple[str, _Shape, _Fn]] = {
    "gate_proj": ("gate_proj", lambda c: (c.intermediate_size, c.hidden_size), _T),  # [E, F]
    "up_proj": ("up_proj", lambda c: (c.intermediate_size, c.hidden_size), _T),
    "down_proj": ("down_proj", lambda c: (c.hidden_size, c.intermediate_size), _T),  # [F, E]
    "router": ("router", lambda c: (c.num_experts, c.hidden_size), _T),  # [E, experts]
    "expert_gate": ("experts/gate_proj", lambda c: (_I(c), c.hidden_size), _T),
    "expert_up": ("experts/up_proj", lambda c: (_I(c), c.hidden_size), _T),
    "expert_down": ("experts/down_proj", lambda c: (c.hidden_size, _I(c)), _T),
    "experts_gate": ("experts/gate_proj", lambda c: (c.num_experts, _I(c), c.hidden_size), _T),
    "experts_up": ("experts/up_proj", lambda c: (c.num_experts, _I(c), c.hidden_size), _T),
    "experts_down": ("experts/down_proj", lambda c: (c.num_experts, c.hidden_size, _I(c)), _T),
}
# transformers 5 in memory packs gate and up: [experts, 2 * I, H], the gate's rows first
_PACKED = {"experts_gate_up": ("experts_gate", "experts_up")}

ROLES = (*_ROLES, *_FFN, *_PACKED)


def expected_role(role: str | None, config: ModelConfig) -> bool:
    """Whether a source tensor playing `role` belongs in this model: a known role, and no
    q/k/v bias or q/k norm where the model has none."""
    if role is None:
        return False
    if role.endswith(".bias"):
        return config.attention_bias
    return config.qk_norm or role not in ("q_norm", "k_norm")


def num_items(role: str) -> int:
    """How many TensorItems one source tensor playing `role` becomes."""
    return len(_PACKED.get(role, (role,)))


def to_our_layout(role: str, index: Index, w: np.ndarray, config: ModelConfig,
                  name: str) -> list[TensorItem]:
    """An HF-layout tensor `name` playing `role` -> [(our path, index, array)].

    index: None for unstacked roles, the layer, or (layer, expert) for one expert.
    """
    if role in _PACKED:
        c = config
        _check_shape(name, w, (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size))
        halves = np.split(w, 2, axis=1)
        return [item for part, half in zip(_PACKED[role], halves, strict=True)
                for item in to_our_layout(part, index, half, config, name)]
    if role in _FFN:
        leaf, hf_shape, fn = _FFN[role]
        layer, expert = index if isinstance(index, tuple) else (index, None)
        if layer is None or (expert is not None) != role.startswith("expert_"):
            raise CheckpointError(f"tensor {name!r}: index {index} for {role!r} is unexpected")
        try:
            path, row = ffn_param(config, leaf, layer)
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r}: {e} in this model") from None
        _check_shape(name, w, hf_shape(config))
        return [(path, row if expert is None else (row, expert), fn(w, config))]
    path, per_layer, hf_shape, fn = _ROLES[role]
    if per_layer != (index is not None):
        raise CheckpointError(f"tensor {name!r}: layer index {index} for {role!r} is unexpected")
    _check_shape(name, w, hf_shape(config))
    return [(path, index, fn(w, config))]


def _check_shape(name: str, w: np.ndarray, expected: tuple[int, ...]) -> None:
    if tuple(w.shape) != expected:
        raise CheckpointError(f"tensor {name!r}: shape {tuple(w.shape)} does not match the "
                              f"model config (expected {expected})")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype
