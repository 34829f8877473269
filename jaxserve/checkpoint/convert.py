"""`jaxserve convert`: a GGUF file or an HF safetensors directory -> an Orbax checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jaxserve.checkpoint import orbax_store
from jaxserve.checkpoint.gguf import GGUFCheckpoint
from jaxserve.checkpoint.safetensors import SafetensorsCheckpoint
from jaxserve.checkpoint.source import SourceCheckpoint
from jaxserve.errors import CheckpointError
from jaxserve.models.model_config import ModelConfig


def open_source(source_path: Path | str) -> SourceCheckpoint:
    """GGUFCheckpoint for a .gguf file, SafetensorsCheckpoint for a directory with config.json."""
    path = Path(source_path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir() and (path / "config.json").is_file():
        return SafetensorsCheckpoint(path)
    raise CheckpointError(
        f"{path}: not a checkpoint this converter reads; expected a .gguf file or a Hugging "
        "Face directory with config.json and *.safetensors")


def source_identity(source_path: Path | str, dtype: str | None = None,
                    quantization: str = "none") -> str:
    """A digest of what a conversion depends on: the source's resolved path, the size and
    modification time of its files, the conversion options and the output format version.
    A checkpoint converted from anything else has another identity."""
    path = Path(source_path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = {"source": str(path), "files": stats, "dtype": dtype,
           "format": orbax_store.FORMAT_VERSION}
    if quantization != "none":
        key["quantization"] = quantization
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def convert(source_path: Path | str, out_dir: Path | str, dtype: str | None = None,
            progress: bool = True, *, tokenizer: bool = True,
            overwrite: bool = False, quantization: str = "none") -> ModelConfig:
    """Convert and return the ModelConfig written next to the params; the completion marker
    records the source's identity (`source_identity`).

    dtype: float32 | bfloat16 | float16. None: the source's own precision, i.e. float32
    for quantized or F32 sources, bfloat16 for BF16 (float16 for F16) checkpoints.
    quantization: none | int8 | fp8: store the linear layers' weights quantized
    (models/quant.py); the other tensors stay in dtype.
    """
    source = open_source(source_path)
    return orbax_store.save(source, out_dir, dtype, progress, tokenizer=tokenizer,
                            overwrite=overwrite, quantization=quantization,
                            identity=source_identity(source_path, dtype, quantization))
