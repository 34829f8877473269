"""What a source checkpoint format (GGUF, HF safetensors) gives the Orbax writer.

A source yields our parameters one tensor at a time, already in our layout (see
jaxserve/models/llama.py), so the writer never holds more than one tensor in memory:
`(path, layer, array)` where `path` is a `param_specs` key and `layer` is the index on
the stacked `layers` axis (None for unstacked parameters such as the embedding).

Both formats name tensors differently but store matrices the same way, HF `[out, in]`.
They map their names to the roles below and call `to_our_layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jaxserve.errors import CheckpointError
from jaxserve.models.model_config import ModelConfig

TensorItem = tuple[str, int | None, np.ndarray]  # (param path, layer or None, array)

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


# role -> (our path, per layer?, HF [out, in] shape, HF -> ours)
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
    "o_proj": ("layers/attn/o_proj", True,
               lambda c: (c.hidden_size, c.num_heads * c.head_dim),
               lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)),  # [N, D, E]
    "gate_proj": ("layers/mlp/gate_proj", True,
                  lambda c: (c.intermediate_size, c.hidden_size), _transpose),  # [E, F]
    "up_proj": ("layers/mlp/up_proj", True,
                lambda c: (c.intermediate_size, c.hidden_size), _transpose),  # [E, F]
    "down_proj": ("layers/mlp/down_proj", True,
                  lambda c: (c.hidden_size, c.intermediate_size), _transpose),  # [F, E]
}

ROLES = tuple(_ROLES)


def to_our_layout(role: str, layer: int | None, w: np.ndarray, config: ModelConfig,
                  name: str) -> TensorItem:
    """An HF-layout tensor `name` playing `role` -> (our path, layer, array in our layout)."""
    path, per_layer, hf_shape, fn = _ROLES[role]
    if per_layer != (layer is not None):
        raise CheckpointError(f"tensor {name!r}: layer index {layer} for {role!r} is unexpected")
    expected = hf_shape(config)
    if tuple(w.shape) != expected:
        raise CheckpointError(
            f"tensor {name!r}: shape {tuple(w.shape)} does not match the model config "
            f"(expected {expected})"
        )
    return path, layer, fn(w, config)


def param_path(role: str) -> str:
    return _ROLES[role][0]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype
