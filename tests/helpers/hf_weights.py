"""Random weights of a tiny Llama under Hugging Face names and layout, for the checkpoint
source tests (safetensors directories and the GGUFs llama.cpp's converter would write)."""

import numpy as np

V, E, F, L, H, K = 96, 64, 128, 2, 4, 2  # vocab, embed, mlp, layers, heads, kv heads
D = E // H  # head_dim


def hf_weights(seed: int = 0, *, d: int = D, untied: bool = False, bias: bool = False) -> dict:
    """Normal(0, 1) float32 weights, HF [out, in] layout; `d` the head_dim of q/k/v/o."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    w = {"model.embed_tokens.weight": r(V, E), "model.norm.weight": r(E)}
    if untied:
        w["lm_head.weight"] = r(V, E)
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": r(E), p + "post_attention_layernorm.weight": r(E),
              p + "self_attn.q_proj.weight": r(H * d, E),
              p + "self_attn.k_proj.weight": r(K * d, E),
              p + "self_attn.v_proj.weight": r(K * d, E),
              p + "self_attn.o_proj.weight": r(E, H * d),
              p + "mlp.gate_proj.weight": r(F, E), p + "mlp.up_proj.weight": r(F, E),
              p + "mlp.down_proj.weight": r(E, F)}
        if bias:
            w |= {p + "self_attn.q_proj.bias": r(H * d), p + "self_attn.k_proj.bias": r(K * d),
                  p + "self_attn.v_proj.bias": r(K * d)}
    return w
