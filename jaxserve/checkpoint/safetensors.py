"""Hugging Face directory (config.json + *.safetensors) -> ModelConfig + our parameters.

Tensors are read one at a time. numpy has no bfloat16, so `safe_open(framework="numpy")`
cannot return BF16 tensors: those are memory-mapped straight from the file at the offsets
in its header and viewed as `ml_dtypes.bfloat16`. Arrays are yielded in the source dtype
(the Orbax writer casts); matrices are HF `[out, in]` and are transposed to our layout.

FP8 checkpoints (an `F8_E4M3` weight with a `weight_scale`, per tensor or per output
channel, as compressed-tensors writes them; or a `weight_scale_inv` per 128 x 128 block, as
transformers' `fp8` format does) are read and scaled back to float32 here: the converter
then sees full precision, and `--quantize fp8` (or `model.quantization: fp8`) stores 8-bit
weights again, per output channel. A channel-scaled checkpoint whose channels reach the
fp8 maximum, as quantizers write them, comes back to the same bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

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

INDEX = "model.safetensors.index.json"

_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed_tokens", "lm_head.weight": "lm_head",
                 "model.norm.weight": "norm"}
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    **{f"self_attn.{p}_proj.weight": f"{p}_proj" for p in "qkvo"},
    **{f"self_attn.{p}_proj.bias": f"{p}_proj.bias" for p in "qkv"},
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",
    **{f"mlp.{p}_proj.weight": f"{p}_proj" for p in ("gate", "up", "down")},
    # MoE: the router, and every expert of the layer packed (transformers 5 in memory)
    "mlp.gate.weight": "router", "block_sparse_moe.gate.weight": "router",
    "mlp.experts.gate_up_proj": "experts_gate_up", "mlp.experts.down_proj": "experts_down",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# One expert: Mixtral's w1/w3/w2 or Qwen-MoE's gate/up/down_proj
_EXPERT_RE = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
_EXPERT_ROLES = {"w1": "expert_gate", "w3": "expert_up", "w2": "expert_down",
                 "gate_proj": "expert_gate", "up_proj": "expert_up",
                 "down_proj": "expert_down"}
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# An FP8 weight's companions: its scale(s), read with it; a static activation scale, unused
# (jaxserve quantizes weights only).
_FP8_SCALES = ("weight_scale", "weight_scale_inv")
_COMPANION = re.compile(r".+\.(weight_scale|weight_scale_inv|input_scale)")
FP8_BLOCK = 128  # transformers' fp8 format: one scale per 128 x 128 block
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
# Dtypes numpy lacks, memory-mapped from the file at the header's offsets
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}
_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class SafetensorsCheckpoint:
    """A SourceCheckpoint over a Hugging Face model directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"checkpoint not found: {config_path}")
        try:
            hf = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
        self.config = model_config_from_hf(hf, config_path, name=self.path.name)
        self._files = self._tensor_files()
        self._headers = {f: _read_header(f) for f in self._files}
        self._plan = self._tensor_plan()
        dtypes = {self._headers[f][0][n]["dtype"] for f, n, _, _ in self._plan}
        stated = hf.get("dtype") or hf.get("torch_dtype")  # transformers 5 / 4.x spelling
        self.default_dtype = (_DTYPE_NAMES.get(dtypes.pop(), "float32") if len(dtypes) == 1
                              else stated if stated in _DTYPE_NAMES.values() else "float32")

    @property
    def num_tensors(self) -> int:
        return sum(num_items(role) for _, _, role, _ in self._plan)

    def tensors(self) -> Iterator[TensorItem]:
        for file, name, role, index in self._plan:
            yield from to_our_layout(role, index, self._read(file, name), self.config, name)

    def write_tokenizer_assets(self, out_dir: Path) -> None:
        from jaxserve.tokenizer import copy_tokenizer_assets_from_hf

        copy_tokenizer_assets_from_hf(self.path, Path(out_dir))

    def _tensor_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: no readable weight_map: {e}") from e
            files = [self.path / f for f in sorted(set(weight_map.values()))]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {INDEX} but missing")
        return files

    def _tensor_plan(self) -> list[tuple[Path, str, str, Index]]:
        plan, seen = [], {}
        for file in self._files:
            for name in sorted(self._headers[file][0]):
                if name in seen:
                    raise CheckpointError(f"tensor {name!r} is in both {seen[name]} and {file}")
                seen[name] = file
                role, layer, expert = _GLOBAL_NAMES.get(name), None, None
                if role is None and (m := _LAYER_RE.fullmatch(name)):
                    role, layer = _LAYER_NAMES.get(m.group(2)), int(m.group(1))
                    if role is None and (e := _EXPERT_RE.fullmatch(m.group(2))):
                        role, expert = _EXPERT_ROLES.get(e.group(2)), int(e.group(1))
                        if expert >= self.config.num_experts:
                            raise CheckpointError(
                                f"{file}: tensor {name!r} is beyond num_experts="
                                f"{self.config.num_experts}")
                if _COMPANION.fullmatch(name):
                    continue  # read with its weight (_read)
                if _IGNORED.fullmatch(name) or (role == "lm_head"
                                                and self.config.tie_word_embeddings):
                    continue
                if not expected_role(role, self.config):
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for "
                                          f"architecture {self.config.architecture!r}")
                if layer is not None and layer >= self.config.num_layers:
                    raise CheckpointError(f"{file}: tensor {name!r} is beyond "
                                          f"num_hidden_layers={self.config.num_layers}")
                index = layer if expert is None else (layer, expert)
                plan.append((file, name, role, index))
        return plan

    def _read(self, file: Path, name: str) -> np.ndarray:
        header, data_start = self._headers[file]
        entry = header[name]
        if entry["dtype"] in _RAW_DTYPES:
            begin, end = entry["data_offsets"]
            raw = np.memmap(file, dtype=np.uint8, mode="r", offset=data_start + begin,
                            shape=(end - begin,))
            array = raw.view(_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            return self._fp8_to_f32(file, name, array) if entry["dtype"] == "F8_E4M3" \
                else array
        if entry["dtype"] not in _NUMPY_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype "
                                  f"{entry['dtype']}")
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except SafetensorError as e:  # what the header check before could not see
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None

    def _fp8_to_f32(self, file: Path, name: str, q: np.ndarray) -> np.ndarray:
        """An F8_E4M3 weight [out, in] times its scale: per tensor, per output channel, or
        per 128 x 128 block."""
        stem = name[:-len("weight")]
        found = [(stem + s, f) for s in _FP8_SCALES for f in self._files
                 if stem + s in self._headers[f][0]]
        if not found:
            raise CheckpointError(f"{file}: FP8 tensor {name!r} has no {stem}weight_scale or "
                                  f"{stem}weight_scale_inv")
        scale_name, scale_file = found[0]
        scale = np.asarray(self._read(scale_file, scale_name), np.float32)
        w = q.astype(np.float32)
        out, cols = w.shape
        if scale_name.endswith("_inv"):  # one scale per 128 x 128 block
            blocks = (-(-out // FP8_BLOCK), -(-cols // FP8_BLOCK))
            if scale.shape != blocks:
                raise CheckpointError(f"{file}: {scale_name!r} has shape {list(scale.shape)}; "
                                      f"{name!r} {list(w.shape)} needs {list(blocks)} blocks")
            full = np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)
            return w * full[:out, :cols]
        # By shape, not by size: a block scale [out / 128, in / 128] can hold `out` values.
        if scale.shape in ((), (1,), (1, 1)):
            return w * scale.reshape(())
        if scale.shape in ((out,), (out, 1)):
            return w * scale.reshape(out, 1)
        raise CheckpointError(f"{file}: {scale_name!r} has shape {list(scale.shape)}; "
                              f"{name!r} [{out}, {cols}] takes [] or [1] (per tensor), or "
                              f"[{out}] or [{out}, 1] (per channel)")


def model_config_from_hf(hf: dict, config_path: Path, name: str = "model") -> ModelConfig:
    """ModelConfig from a transformers config.json dict (4.x or 5.x spellings)."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    try:
        if len(archs) != 1:
            raise ValueError(f"one architecture expected, got {archs}")
        family = registry.by_hf_class(archs[0])
        fields = family.read_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing key {e}") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    heads = hf.get("num_attention_heads")
    try:
        common = dict(
            architecture=family.name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(_rope_params(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(_rope_params(hf), config_path),
            name=name,
        )
    except KeyError as e:
        raise CheckpointError(f"{config_path}: missing key {e}") from e
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{config_path}: malformed model settings: {e}") from e
    try:
        return ModelConfig(**{**common, **fields})
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def _rope_params(hf: dict) -> dict:
    """`rope_scaling` (transformers 4.x) or `rope_parameters` (5.x); {} when absent."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def _rope_scaling(params: dict, config_path: Path) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise CheckpointError(f"{config_path}: rope scaling type {kind!r} is not supported "
                              "(only 'llama3')")
    try:
        return RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{config_path}: rope scaling is missing {e}") from e


# Bytes per element of the safetensors dtypes (others are refused when read).
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
             "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def _read_header(file: Path) -> tuple[dict, int]:
    """The safetensors JSON header (tensor entries only) and where the data starts."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > file.stat().st_size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (its header length, "
                                  f"{size} bytes, is past the end of the file)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(file, name, entry)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if file.stat().st_size < 8 + size + end:
        raise CheckpointError(f"{file}: truncated safetensors file "
                              f"({file.stat().st_size} bytes, header needs {8 + size + end})")
    return header, 8 + size


def _check_entry(file: Path, name: str, entry) -> None:
    """A tensor entry of a safetensors header: a dtype, a shape of sizes and data offsets
    whose span holds exactly that many elements."""
    def ints(value, n=None):
        return isinstance(value, list) and (n is None or len(value) == n) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
            and ints(entry.get("shape")) and ints(entry.get("data_offsets"), 2)
            and entry["data_offsets"][0] <= entry["data_offsets"][1]):
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry "
                              "(it needs a dtype, a shape and two data offsets)")
    itemsize = _ITEMSIZE.get(entry["dtype"])
    begin, end = entry["data_offsets"]
    if itemsize is not None and math.prod(entry["shape"]) * itemsize != end - begin:
        raise CheckpointError(f"{file}: tensor {name!r} of shape {entry['shape']} and dtype "
                              f"{entry['dtype']} does not fill its {end - begin} bytes")
