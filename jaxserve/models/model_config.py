"""ModelConfig: the shapes and constants of a Llama-family decoder, dense or MoE.

Written next to every converted checkpoint as `model_config.json`; read back when the
checkpoint is loaded. Converters build it from GGUF metadata or an HF `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path

from jaxserve.config import QUANTIZATIONS as MODES
from jaxserve.errors import CheckpointError
from jaxserve.models.registry import SUPPORTED as SUPPORTED_ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
               "num_kv_heads", "head_dim", "max_position_embeddings", "num_experts",
               "num_experts_per_tok", "moe_intermediate_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES (jaxserve/models/registry.py)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry biases
    rope_scaling: RopeScaling | None = None
    name: str = "model"
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    # Mixture of experts (num_experts = 0: a dense model). Every layer not in dense_layers
    # routes each token to num_experts_per_tok experts of moe_intermediate_size columns.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    dense_layers: tuple[int, ...] = ()  # MoE models only: layers that keep a dense MLP
    # Weight-only quantization of the linear layers as stored: none | int8 | fp8
    # (models/quant.py).
    quantization: str = "none"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise CheckpointError(f"model config: {name}={value!r} must be an integer")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise CheckpointError(f"model config: {name}={value!r} must be a number")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.num_experts:
            self._check_experts()
        if self.quantization not in MODES:
            raise CheckpointError(f"model config: quantization={self.quantization!r} is not "
                                  f"one of {', '.join(MODES)}")

    def _check_experts(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(
                f"model config: num_experts_per_tok={self.num_experts_per_tok} must be "
                f"between 1 and num_experts={self.num_experts}")
        if self.moe_intermediate_size <= 0:
            raise CheckpointError(f"model config: moe_intermediate_size="
                                  f"{self.moe_intermediate_size} must be > 0")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad or list(self.dense_layers) != sorted(set(self.dense_layers)):
            raise CheckpointError(f"model config: dense_layers={list(self.dense_layers)} must "
                                  f"be increasing layer indices below {self.num_layers}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.dense_layers) < self.num_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers whose MLP is a mixture of experts."""
        if not self.is_moe:
            return ()
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @property
    def is_mixed(self) -> bool:
        """Dense and MoE layers in one model (their MLP weights are stacked apart)."""
        return self.is_moe and bool(self.dense_layers)

    @property
    def num_params(self) -> int:
        e, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkvo = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        moe = self.num_experts * (3 * e * self.moe_intermediate_size + e)
        mlps = (self.num_layers - len(self.moe_layers)) * 3 * e * f + len(self.moe_layers) * moe
        per_layer = qkvo + 2 * e + (2 * self.head_dim if self.qk_norm else 0)
        return (v * e * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer
                + mlps + e)

    @property
    def active_params(self) -> int:
        """Parameters one token reads: only num_experts_per_tok of each MoE layer's experts."""
        unused = self.num_experts - self.num_experts_per_tok
        return self.num_params - len(self.moe_layers) * unused * 3 * self.hidden_size * \
            self.moe_intermediate_size

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if "dense_layers" in d:
            d["dense_layers"] = tuple(d["dense_layers"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"model config: unknown keys {sorted(unknown)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: model_config.json not found")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read model config: {e}") from e
