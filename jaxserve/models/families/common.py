"""Config.json readings that several families share."""

from __future__ import annotations

from typing import Any


def refuse_sliding_window(hf: dict[str, Any]) -> None:
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")


def refuse_biases(hf: dict[str, Any], family: str) -> None:
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise ValueError(f"attention_bias/mlp_bias on {family} (biases on o_proj/MLP) are "
                         "not supported")


def num_experts(hf: dict[str, Any]) -> int:
    """`num_local_experts` (Mixtral, transformers 5) or `num_experts` (Qwen-MoE, 4.x)."""
    n = hf.get("num_local_experts", hf.get("num_experts"))
    if n is None:
        raise ValueError("neither num_local_experts nor num_experts is set")
    return int(n)
