"""GGUF (llama.cpp) -> ModelConfig + our parameters, one float32 tensor at a time.

The file is memory-mapped by `gguf.GGUFReader`; each tensor is dequantized with
`gguf.quants.dequantize` only when it is yielded. GGUF lists dimensions innermost first;
the reader's arrays are already in numpy order, so matrices come out HF `[out, in]`.

llama.cpp's converter permutes the rows of Q and K of `llama` models (not `qwen2`) so that
its interleaved RoPE matches HF's rotate-half RoPE; `_unpermute` undoes that per head.

Rope scaling: `{arch}.rope.scaling.type` none/absent is no scaling; other types are
refused (our model implements Llama-3 scaling only). Llama 3.1+ GGUFs instead carry a
`rope_freqs.weight` tensor of per-frequency divisors; we recover an equivalent
`RopeScaling` from it and check that it reproduces those divisors exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from jaxserve.checkpoint.source import (
    Index,
    TensorItem,
    expected_role,
    num_items,
    to_our_layout,
)
from jaxserve.errors import CheckpointError
from jaxserve.models import registry
from jaxserve.models.model_config import ModelConfig, RopeScaling
from jaxserve.models.rope import inverse_frequencies

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
})

_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens", "output.weight": "lm_head",
                 "output_norm.weight": "norm"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm", "ffn_norm.weight": "post_attention_layernorm",
    "attn_q.weight": "q_proj", "attn_k.weight": "k_proj", "attn_v.weight": "v_proj",
    "attn_q.bias": "q_proj.bias", "attn_k.bias": "k_proj.bias", "attn_v.bias": "v_proj.bias",
    "attn_output.weight": "o_proj", "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj", "ffn_down.weight": "down_proj",
    "attn_q_norm.weight": "q_norm", "attn_k_norm.weight": "k_norm",
    "ffn_gate_inp.weight": "router", "ffn_gate_exps.weight": "experts_gate",
    "ffn_up_exps.weight": "experts_up", "ffn_down_exps.weight": "experts_down",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_OLD_EXPERT_RE = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")
ROPE_FREQS = "rope_freqs.weight"
_MISSING = object()


class GGUFCheckpoint:
    """A SourceCheckpoint over one (unsplit) .gguf file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # a truncated header fails inside the reader in many ways
            raise CheckpointError(f"{self.path}: not a readable GGUF file: "
                                  f"{type(e).__name__}: {e}") from e
        if self._get("split.count", 1) > 1:
            raise CheckpointError(f"{self.path}: split GGUF files are not supported; "
                                  "merge them first (llama-gguf-split --merge)")
        self._by_name = {t.name: t for t in self.reader.tensors}
        try:
            self.config = self._model_config()
        except CheckpointError:  # a ValueError too, already naming the file
            raise
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise CheckpointError(f"{self.path}: malformed model metadata: {e}") from e
        self._plan = self._tensor_plan()
        self.default_dtype = self._default_dtype()

    @property
    def num_tensors(self) -> int:
        return sum(num_items(role) for _, role, _ in self._plan)

    def tensors(self) -> Iterator[TensorItem]:
        permuted = registry.ARCHITECTURES[self.config.architecture].gguf_permuted_qk
        for t, role, index in self._plan:
            w = self._dequantize(t)
            if permuted and role in ("q_proj", "k_proj", "q_proj.bias", "k_proj.bias"):
                c = self.config
                w = _unpermute(w, c.num_heads if role.startswith("q") else c.num_kv_heads)
            yield from to_our_layout(role, index, w, self.config, t.name)

    def write_tokenizer_assets(self, out_dir: Path) -> None:
        from jaxserve.tokenizer import write_tokenizer_assets_from_gguf

        write_tokenizer_assets_from_gguf(self.reader, Path(out_dir))

    # -- metadata ---------------------------------------------------------------------

    def _get(self, key: str, default=_MISSING):
        field = self.reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return _field_value(field)

    def _model_config(self) -> ModelConfig:
        arch = self._get("general.architecture")
        g = lambda key, default=_MISSING: self._get(f"{arch}.{key}", default)
        experts = int(g("expert_count", 0) or 0)
        if old := next((n for n in self._by_name if _OLD_EXPERT_RE.fullmatch(n)), None):
            raise CheckpointError(f"{self.path}: tensor {old!r}: one tensor per expert (old "
                                  "Mixtral GGUFs) is not supported; reconvert the model with "
                                  "a current llama.cpp, which stacks them (ffn_*_exps)")
        if any(n.endswith("_exps.weight") for n in self._by_name) != (experts > 0):
            raise CheckpointError(f"{self.path}: {arch}.expert_count={experts} does not match "
                                  "the file's expert tensors (ffn_*_exps)")
        try:
            family = registry.by_gguf(arch, experts > 0)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        embed, heads = g("embedding_length"), g("attention.head_count")
        kv_heads = _uniform(g("attention.head_count_kv", heads), "head_count_kv", self.path)
        head_dim = self._head_dim(g, embed, heads)
        theta = float(g("rope.freq_base", 10000.0))
        if "token_embd.weight" not in self._by_name:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        ffn = _uniform(g("feed_forward_length"), "feed_forward_length", self.path)
        moe = {} if not experts else {
            "num_experts": experts,
            "num_experts_per_tok": int(g("expert_used_count")),
            "moe_intermediate_size": int(g("expert_feed_forward_length", ffn)),
            "norm_topk_prob": bool(g("expert_weights_norm", True)),
            "dense_layers": tuple(i for i in range(g("block_count"))
                                  if f"blk.{i}.ffn_gate_inp.weight" not in self._by_name),
        }
        return ModelConfig(
            architecture=family.name,
            vocab_size=int(self._by_name["token_embd.weight"].shape[1]),
            hidden_size=embed,
            intermediate_size=ffn,
            num_layers=g("block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=theta,
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=g("context_length", 4096),
            tie_word_embeddings="output.weight" not in self._by_name,
            attention_bias="blk.0.attn_q.bias" in self._by_name,
            rope_scaling=self._rope_scaling(g, head_dim, theta),
            name=self._get("general.name", self.path.stem),
            **moe,
            **family.gguf_fields,
        )

    def _head_dim(self, g, embed: int, heads: int) -> int:
        key_len, value_len = g("attention.key_length", None), g("attention.value_length", None)
        rope_dim = g("rope.dimension_count", None)
        head_dim = key_len or rope_dim or embed // heads
        for name, value in (("attention.value_length", value_len),
                            ("rope.dimension_count", rope_dim)):
            if value is not None and value != head_dim:
                raise CheckpointError(f"{self.path}: {name}={value} differs from the head "
                                      f"dim {head_dim}; not supported")
        return head_dim

    def _rope_scaling(self, g, head_dim: int, theta: float) -> RopeScaling | None:
        kind = g("rope.scaling.type", "none")
        factor = float(g("rope.scaling.factor", 1.0))
        if kind not in ("none", "") and factor != 1.0:
            raise CheckpointError(f"{self.path}: rope scaling type {kind!r} is not supported "
                                  "(only Llama-3 scaling via rope_freqs.weight)")
        t = self._by_name.get(ROPE_FREQS)
        if t is None:
            return None
        divisors = self._dequantize(t).astype(np.float64)
        original = g("rope.scaling.original_context_length", 8192)
        return rope_scaling_from_freq_factors(divisors, head_dim, theta, original, self.path)

    # -- tensors ----------------------------------------------------------------------

    def _tensor_plan(self) -> list[tuple[gguf.ReaderTensor, str, Index]]:
        plan = []
        for t in self.reader.tensors:
            if t.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} has unsupported quantization type "
                    f"{t.tensor_type.name}; supported: "
                    f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
            if t.name == ROPE_FREQS:
                continue
            role, layer = _GLOBAL_NAMES.get(t.name), None
            if role is None and (m := _LAYER_RE.fullmatch(t.name)):
                role, layer = _LAYER_NAMES.get(m.group(2)), int(m.group(1))
                if layer >= self.config.num_layers:
                    raise CheckpointError(f"{self.path}: tensor {t.name!r} is beyond "
                                          f"block_count={self.config.num_layers}")
            if not expected_role(role, self.config):
                raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r} for "
                                      f"architecture {self.config.architecture!r}")
            plan.append((t, role, layer))
        return plan

    def _dequantize(self, t: gguf.ReaderTensor) -> np.ndarray:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {t.name!r} "
                                  f"({t.tensor_type.name}): {e}") from e
        return np.array(w, dtype=np.float32)  # a copy: never a view of the mapped file

    def _default_dtype(self) -> str:
        kinds = {t.tensor_type for t, _, _ in self._plan if len(t.shape) > 1}
        return {frozenset({Q.BF16}): "bfloat16", frozenset({Q.F16}): "float16"}.get(
            frozenset(kinds), "float32")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of Q/K (weights [rows, in] or bias [rows])."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def rope_scaling_from_freq_factors(divisors: np.ndarray, head_dim: int, theta: float,
                                   original: int, path: Path) -> RopeScaling | None:
    """A Llama-3 RopeScaling whose frequencies equal base / divisors (llama.cpp rope_freqs).

    In the blend band, 1/divisor = (1 - s)/factor + s with s linear in 1/wavelength:
    s = original/(high - low) / wavelength - low/(high - low). Fitting that line gives
    low/high for the given original context length; the result is checked against the
    divisors, which is what decides.
    """
    if divisors.shape != (head_dim // 2,):
        raise CheckpointError(f"{path}: {ROPE_FREQS} has shape {divisors.shape}, "
                              f"expected ({head_dim // 2},)")
    if np.allclose(divisors, 1.0):
        return None
    base = inverse_frequencies(head_dim, theta, None).astype(np.float64)
    factor = float(divisors.max())
    candidates = [RopeScaling(factor, 1.0, 4.0, original)]
    mid = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if mid.sum() >= 2 and factor > 1:
        s = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(base[mid] / (2 * np.pi), s, 1)
        width = original / slope
        low = -intercept * width
        candidates.insert(0, RopeScaling(factor, round(float(low), 4),
                                         round(float(low + width), 4), original))
    for scaling in candidates:
        if np.allclose(inverse_frequencies(head_dim, theta, scaling), base / divisors,
                       rtol=1e-4, atol=0):
            return scaling
    raise CheckpointError(f"{path}: {ROPE_FREQS} does not match Llama-3 rope scaling; "
                          "not supported")


def _field_value(field):
    kinds = field.types
    decode = lambda i: bytes(field.parts[i]).decode("utf-8")
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [decode(i) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return decode(field.data[0])
    return field.parts[field.data[0]].tolist()[0]


def _uniform(value, key: str, path: Path) -> int:
    """Per-layer metadata given as a list must be the same for every layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} varies across layers ({value}); "
                                  "not supported")
        value = value[0]
    return int(value)
