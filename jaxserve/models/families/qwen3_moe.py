"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3 attention (q/k norms), sparse MoE MLPs.

Layer i is sparse when it is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step
== 0; the others keep a dense MLP of `intermediate_size` columns. Experts have
`moe_intermediate_size` columns. Routing: softmax, top-k, renormalised only when
`norm_topk_prob` is true.
"""

from jaxserve.models.families.common import num_experts
from jaxserve.models.families.qwen3 import read_hf as read_qwen3
from jaxserve.models.registry import Architecture


def read_hf(hf: dict) -> dict:
    fields = read_qwen3(hf)
    experts = num_experts(hf)
    step = int(hf.get("decoder_sparse_step", 1)) or 1
    only_mlp = set(hf.get("mlp_only_layers") or ())
    layers = int(hf["num_hidden_layers"])
    dense = tuple(i for i in range(layers)
                  if i in only_mlp or experts == 0 or (i + 1) % step != 0)
    return {**fields, "num_experts": experts,
            "num_experts_per_tok": int(hf.get("num_experts_per_tok", 8)),
            "moe_intermediate_size": int(hf["moe_intermediate_size"]),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
            "dense_layers": dense}


ARCH = Architecture("qwen3_moe", ("Qwen3MoeForCausalLM",), read_hf, gguf=("qwen3moe", True),
                    gguf_fields={"qk_norm": True})
