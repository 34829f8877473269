"""Qwen3 (`Qwen3ForCausalLM`): per-head RMSNorm of q and k before RoPE, no q/k/v biases."""

from jaxserve.models.families.common import refuse_sliding_window
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    refuse_sliding_window(hf)
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias on Qwen3 is not supported")
    return {"qk_norm": True, "attention_bias": bool(hf.get("attention_bias", False))}


ARCH = Architecture("qwen3", ("Qwen3ForCausalLM",), read_hf, gguf=("qwen3", False),
                    gguf_fields={"qk_norm": True})
