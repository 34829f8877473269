"""The architecture registry: one entry per model family we serve.

Each family lives in its own small file under `families/` and says how its Hugging Face
`config.json` and its GGUF metadata map onto ModelConfig. Everything else (the model code,
the checkpoint tensor names) is shared: the families differ by flags (attention biases,
q/k norms, experts), not by code paths. Adding a family is one file and one line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # ModelConfig.architecture
    hf_classes: tuple[str, ...]  # config.json "architectures" entries
    # HF config.json -> the family's own ModelConfig fields (the common ones are read by
    # checkpoint/safetensors.py); raises ValueError naming what it does not support.
    read_hf: Callable[[dict[str, Any]], dict[str, Any]]
    # GGUF `general.architecture` and whether the file holds expert tensors; None: the
    # family has no GGUF spelling of its own (Mistral GGUFs say "llama").
    gguf: tuple[str, bool] | None = None
    # llama.cpp's converter permutes the rows of Q and K for its RoPE (the `llama` family).
    gguf_permuted_qk: bool = False
    # ModelConfig fields a GGUF of this family implies (its metadata does not say them)
    gguf_fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _families() -> tuple[Architecture, ...]:
    from jaxserve.models.families import llama, mistral, mixtral, qwen2, qwen3, qwen3_moe

    return (llama.ARCH, mistral.ARCH, qwen2.ARCH, qwen3.ARCH, mixtral.ARCH, qwen3_moe.ARCH)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in _families()}
SUPPORTED = tuple(ARCHITECTURES)
HF_CLASSES: dict[str, Architecture] = {c: a for a in ARCHITECTURES.values() for c in a.hf_classes}
GGUF: dict[tuple[str, bool], Architecture] = {
    a.gguf: a for a in ARCHITECTURES.values() if a.gguf is not None}


def by_hf_class(name: str) -> Architecture:
    """The family of an HF `architectures` entry; ValueError listing the supported ones."""
    if name not in HF_CLASSES:
        raise ValueError(f"unsupported architecture {name!r}; supported: "
                         f"{', '.join(HF_CLASSES)}")
    return HF_CLASSES[name]


def by_gguf(arch: str, has_experts: bool) -> Architecture:
    """The family of a GGUF file's `general.architecture` (+ whether it holds experts)."""
    if (arch, has_experts) not in GGUF:
        names = ", ".join(f"{a}{' (with experts)' if e else ''}" for a, e in GGUF)
        raise ValueError(f"unsupported GGUF architecture {arch!r}"
                         f"{' with expert tensors' if has_experts else ''}; supported: {names}")
    return GGUF[(arch, has_experts)]
