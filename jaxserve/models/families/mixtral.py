"""Mixtral (`MixtralForCausalLM`): Llama attention, every MLP a sparse mixture of experts.

Routing: softmax over the router logits, top-k, then the k weights renormalised to sum to 1.
Each expert has `intermediate_size` columns; there is no dense MLP.
"""

from jaxserve.models.families.common import num_experts, refuse_biases
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    refuse_biases(hf, "MixtralForCausalLM")
    return {"num_experts": num_experts(hf),
            "num_experts_per_tok": int(hf.get("num_experts_per_tok", 2)),
            "moe_intermediate_size": int(hf["intermediate_size"]),
            "norm_topk_prob": True}


ARCH = Architecture("mixtral", ("MixtralForCausalLM",), read_hf, gguf=("llama", True),
                    gguf_permuted_qk=True)
