"""ModelConfig: the shapes and constants of a Llama-family decoder.

Written next to every converted checkpoint as `model_config.json`; read back when the
checkpoint is loaded. Converters build it from GGUF metadata or an HF `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxserve.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
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

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"model config: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        e, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkvo = e * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = qkvo + 3 * e * f + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + e

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
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
