"""Mistral (`MistralForCausalLM`): Llama with a sliding window, which we cap the context at
(within the window, full attention is the same)."""

from jaxserve.models.families.common import refuse_biases
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    refuse_biases(hf, "MistralForCausalLM")
    max_pos = hf.get("max_position_embeddings", 4096)
    if hf.get("sliding_window"):
        max_pos = min(max_pos, hf["sliding_window"])
    return {"max_position_embeddings": max_pos}


ARCH = Architecture("mistral", ("MistralForCausalLM",), read_hf)
