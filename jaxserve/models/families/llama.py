"""Llama 2/3 and SmolLM2 (`LlamaForCausalLM`): the base decoder, no extras."""

from jaxserve.models.families.common import refuse_biases
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    refuse_biases(hf, "LlamaForCausalLM")
    return {}


ARCH = Architecture("llama", ("LlamaForCausalLM",), read_hf, gguf=("llama", False),
                    gguf_permuted_qk=True)
