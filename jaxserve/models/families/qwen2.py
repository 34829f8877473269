"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): biases on the q/k/v projections."""

from jaxserve.models.families.common import refuse_sliding_window
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    refuse_sliding_window(hf)
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias on Qwen2ForCausalLM is not supported")
    return {"attention_bias": True}


ARCH = Architecture("qwen2", ("Qwen2ForCausalLM",), read_hf, gguf=("qwen2", False))
