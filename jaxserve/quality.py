"""Teacher-forced quality of a loaded model: its next-token choice and loss at every position
of a text, so that a quantized model can be compared with full precision.

The text runs through the model as one sequence, in chunks, with the paged KV cache and the
reference attention: at position i the model has read tokens 0..i and predicts token i+1.
`score` returns, per position, the argmax token and the negative log-likelihood of the true
next token; `compare` turns two scores into top-1 agreement and perplexities.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.loader import LoadedModel
from jaxserve.models.llama import (
    AttentionMetadata,
    LlamaModel,
    has_fused_gate_up,
    has_fused_qkv,
    has_layer_arrays,
)
from jaxserve.models.quant import kv_pages_dtype
from pallas_kernels.paged_attention import ragged_paged_attention_reference

PAGE = 16


@dataclasses.dataclass(frozen=True)
class Score:
    argmax: np.ndarray  # [N - 1] the model's top-1 next token after each position
    nll: np.ndarray  # [N - 1] -log p(true next token), float64


def score(loaded: LoadedModel, ids: list[int], dtype: str, kv_dtype: str = "auto",
          chunk: int = 512, kv_rotation: bool = False, transposed: bool = False,
          quantized_activations: bool = False, q8_0_tiles: bool = False) -> Score:
    """Teacher-forced top-1 and loss of `loaded` (one device) over the token ids `ids`, with
    its KV cache in `dtype` (kv_dtype auto) or quantized (int8 | fp8, as cache.kv_dtype),
    its vectors rotated first with kv_rotation (as cache.kv_rotation). `transposed`,
    `quantized_activations` (runner.fp8_activations or int8_activations) and `q8_0_tiles`
    are the runner's keys the model was loaded with."""
    c = loaded.model_config
    model = LlamaModel(c, jnp.dtype(dtype), ragged_paged_attention_reference,
                       scan_unroll=1, kv_rotation=kv_rotation,
                       layer_arrays=has_layer_arrays(loaded.params),
                       fused_qkv=has_fused_qkv(loaded.params),
                       fused_gate_up=has_fused_gate_up(loaded.params),
                       transposed=transposed, quantized_activations=quantized_activations,
                       q8_0_tiles=q8_0_tiles)
    n = len(ids)
    pages = -(-n // PAGE)
    kv_shape = (c.num_layers, pages + 1, PAGE, c.num_kv_heads, c.head_dim)  # page 0: padding
    pages_dtype = kv_pages_dtype(kv_dtype, dtype)
    kv = (jnp.zeros(kv_shape, pages_dtype), jnp.zeros(kv_shape, pages_dtype))
    if kv_dtype != "auto":  # and one scale per (token, KV head)
        kv += (jnp.zeros(kv_shape[:-1], jnp.float32), jnp.zeros(kv_shape[:-1], jnp.float32))
    table = jnp.arange(1, pages + 1, dtype=jnp.int32)[None]
    tokens = np.asarray(ids, np.int32)

    @jax.jit
    def run(params, kv, start, chunk_ids, targets):
        pos = start + jnp.arange(chunk_ids.shape[0], dtype=jnp.int32)
        meta = AttentionMetadata(pos, PAGE + pos, table, (start + chunk_ids.shape[0])[None],
                                 jnp.array([0, chunk_ids.shape[0]], jnp.int32))
        logits, kv = model.apply({"params": params}, chunk_ids, kv, meta,
                                 jnp.arange(chunk_ids.shape[0]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0]
        return kv, jnp.argmax(logits, axis=-1), nll

    argmax, nll = [], []
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)  # positions start..end-1 predict tokens start+1..end
        kv, top, loss = run(loaded.params, kv, jnp.int32(start), jnp.asarray(tokens[start:end]),
                            jnp.asarray(tokens[start + 1:end + 1]))
        argmax.append(np.asarray(top))
        nll.append(np.asarray(loss, np.float64))
    return Score(np.concatenate(argmax), np.concatenate(nll))


def compare(reference: Score, other: Score) -> dict:
    """Top-1 agreement of `other` with `reference`, and both perplexities."""
    return {"positions": int(reference.argmax.size),
            "top1_agreement": float(np.mean(reference.argmax == other.argmax)),
            "perplexity_reference": float(np.exp(reference.nll.mean())),
            "perplexity": float(np.exp(other.nll.mean()))}
