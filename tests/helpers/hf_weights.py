"""Random weights of a tiny Llama under Hugging Face names and layout, and where each lands
in jaxserve's checkpoint (path and layout), for the checkpoint source tests (safetensors
directories and the GGUFs llama.cpp's converter would write)."""

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


_PATHS = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head",
          "model.norm.weight": "final_norm/scale",
          "input_layernorm.weight": "layers/attn_norm/scale",
          "post_attention_layernorm.weight": "layers/mlp_norm/scale",
          "self_attn.o_proj.weight": "layers/attn/o_proj",
          **{f"self_attn.{p}_proj.weight": f"layers/attn/{p}_proj/kernel" for p in "qkv"},
          **{f"self_attn.{p}_proj.bias": f"layers/attn/{p}_proj/bias" for p in "qkv"},
          **{f"mlp.{p}_proj.weight": f"layers/mlp/{p}_proj" for p in ("gate", "up", "down")}}


def our_key(hf_name: str) -> tuple[str, int | None]:
    """(jaxserve param path, layer or None) of an HF tensor name."""
    if hf_name in _PATHS:
        return _PATHS[hf_name], None
    _, _, i, rest = hf_name.split(".", 3)
    return _PATHS[rest], int(i)


def ours(w: np.ndarray, name: str, d: int = D) -> np.ndarray:
    """HF [out, in] -> our layout, written independently of jaxserve.checkpoint.source."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return w.T.reshape(E, -1, d)
    if name.endswith("bias"):
        return w.reshape(-1, d)
    if name.endswith("o_proj.weight"):
        return w.T.reshape(H, d, E)
    if name.endswith(("_proj.weight", "lm_head.weight")):
        return w.T
    return w
