"""The only place that writes and reads Orbax checkpoints.

A converted checkpoint is a directory:
  params/                   Orbax (OCDBT) tree: nested dict matching the model's "params"
  model_config.json         ModelConfig.save
  tokenizer.json | tokenizer.model, tokenizer_config.json
                            tokenizer assets written by jaxserve.tokenizer (when asked)
  jaxserve_checkpoint.json  completion marker, written last: format, dtype, quantization,
                            source, and the size of every other file, so a truncated copy
                            is detected

With `quantize` (int8 | fp8 | q8_0) the linear layers' weights are stored quantized, each with its
`_scale` array (models/quant.py), and model_config.json records the mode.

`save` streams a source tensor by tensor into stacked arrays memory-mapped on disk, then has
Orbax write them a parameter at a time, so host RAM stays bounded by the largest parameter.
It builds everything in `<out_dir>.tmp` and renames that into place at the end.

`load` restores straight into the target shardings (`sharding/rules.py`): each device
reads only its own shard, and no whole-model copy lands on one device.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import uuid
from pathlib import Path

import flax.core.meta
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh
from tqdm import tqdm

from jaxserve.checkpoint.source import SourceCheckpoint, TensorItem, check_dtype
from jaxserve.errors import CheckpointError
from jaxserve.models.llama import nest_params, param_specs
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.quant import SCALE, STORAGE, block_problem, quantize, quantized_weights
from sharding.rules import tree_shardings

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
MARKER = "jaxserve_checkpoint.json"
FORMAT = "jaxserve-orbax"
FORMAT_VERSION = 1
_STAGING = "_staging"
_PYTREE = "state"  # where Orbax's v1 API keeps a saved PyTree inside its checkpoint
_CHUNK_BYTES = 64 << 20  # Orbax storage chunks: a device reading its shard reads little else

Specs = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]


def save(source: SourceCheckpoint, out_dir: Path | str, dtype: str | None = None,
         progress: bool = True, *, tokenizer: bool = True, overwrite: bool = False,
         identity: str | None = None, quantization: str = "none") -> ModelConfig:
    """Convert `source` into an Orbax checkpoint at `out_dir`, stored in `dtype`.

    dtype: float32 | bfloat16 | float16; None means `source.default_dtype`.
    quantization: none | int8 | fp8, the linear layers' storage (models/quant.py).
    tokenizer: also write the tokenizer assets (needs jaxserve.tokenizer).
    """
    dtype = check_dtype(dtype or source.default_dtype)
    out_dir = Path(out_dir).resolve()  # "." has no name to put .tmp after
    if out_dir.exists():
        if not overwrite:
            raise CheckpointError(f"{out_dir} already exists; remove it or pass --overwrite "
                                  "(overwrite=True)")
        # Only a checkpoint of ours, or an empty folder, is replaced: never a folder of other
        # files (a model's source, say).
        if not out_dir.is_dir() or not ((out_dir / MARKER).is_file()
                                        or not any(out_dir.iterdir())):
            raise CheckpointError(f"{out_dir} exists and is not a jaxserve checkpoint; "
                                  "refusing to replace it (remove it or choose another path)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted conversion
    if quantization == "q8_0" and (problem := block_problem(source.config)):
        raise CheckpointError(f"{source.path}: {problem}")
    tmp.mkdir(parents=True)
    try:
        if tokenizer:  # first: a tokenizer that cannot be written fails before the weights
            source.write_tokenizer_assets(tmp)
        config = dataclasses.replace(source.config, quantization=quantization)
        specs = param_specs(config)
        # Weights about to be quantized are staged in float32 whatever dtype says, so they
        # are quantized from the source's own values (a Q8_0 GGUF's blocks come back as
        # they are), never from a bfloat16 rounding of them.
        staged = _stage(source, param_specs(source.config), tmp / _STAGING, jnp.dtype(dtype),
                        progress, float32=set(quantized_weights(specs)))
        if quantization != "none":
            staged = _quantize(staged, specs, quantization, tmp / _STAGING, progress)
        _write_orbax(staged, tmp / PARAMS_DIR, progress)
        del staged
        shutil.rmtree(tmp / _STAGING)
        config.save(tmp / CONFIG_FILE)
        _write_marker(tmp, {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype,
                            "quantization": quantization, "source": str(source.path),
                            "source_identity": identity})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        # A name no earlier, interrupted replacement can have left behind.
        old = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    return config


def read_config(ckpt_dir: Path | str) -> ModelConfig:
    """The ModelConfig of a complete checkpoint, without reading any weight."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint not found: {ckpt_dir}")
    check_complete(ckpt_dir)
    return ModelConfig.load(ckpt_dir / CONFIG_FILE)


def load(ckpt_dir: Path | str, mesh: Mesh, dtype=None,
         replicate: frozenset[str] = frozenset(),
         keep_dtype: frozenset[str] = frozenset()) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) with every array placed by the sharding rules on `mesh`.

    dtype: the arrays' dtype (cast on restore); None keeps the stored dtype.
    replicate: logical axis names to keep whole on every device (see sharding.rules).
    keep_dtype: params restored in their stored dtype whatever `dtype` says (weights about
    to be quantized; quantized weights and their scales always are).
    params is a nested dict, usable as `model.apply({"params": params}, ...)`.
    """
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    specs = param_specs(config)
    stored = _stored_arrays(ckpt_dir / PARAMS_DIR)
    for path, (shape, _) in specs.items():
        if path not in stored:
            raise CheckpointError(f"{ckpt_dir}: parameter {path!r} is missing from {PARAMS_DIR}/")
        if stored[path][0] != shape:
            raise CheckpointError(
                f"{ckpt_dir}: parameter {path!r} has shape {stored[path][0]} in {PARAMS_DIR}/ "
                f"but {shape} per {CONFIG_FILE}")
    extra = sorted(set(stored) - set(specs))
    if extra:
        raise CheckpointError(f"{ckpt_dir}: {PARAMS_DIR}/ holds parameters the model does "
                              f"not have: {extra}")
    shardings = tree_shardings(specs, mesh, replicate)
    quantized = set(quantized_weights(specs))
    quantized |= {p + SCALE for p in quantized} | keep_dtype
    target = nest_params({  # quantized weights and their scales keep their stored dtype
        path: jax.ShapeDtypeStruct(
            shape, jnp.dtype(stored[path][1] if path in quantized else dtype or stored[path][1]),
            sharding=shardings[path])
        for path, (shape, _) in specs.items()
    })
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore((ckpt_dir / PARAMS_DIR).absolute(), target)
    except Exception as e:  # noqa: BLE001 -- Orbax re-raises tensorstore read errors as Exception
        raise CheckpointError(f"{ckpt_dir}: cannot restore {PARAMS_DIR}/ (corrupt or "
                              f"incomplete?): {e}") from e
    return config, params


def save_params(params: dict, config: ModelConfig, out_dir: Path | str,
                dtype: str = "float32", *, overwrite: bool = False) -> ModelConfig:
    """Write an in-memory params tree (e.g. random init; boxed or not) as a checkpoint."""
    return save(_ParamsSource(params, config), out_dir, dtype, progress=False,
                tokenizer=False, overwrite=overwrite)


def check_complete(ckpt_dir: Path) -> dict:
    """The completion marker, after checking every file it lists is there at full size."""
    marker_path = ckpt_dir / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: checkpoint is incomplete (no {MARKER}; "
                              "the conversion did not finish)")
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker_path}: unreadable completion marker: {e}") from e
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{marker_path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    for rel, size in files.items():
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt_dir}: checkpoint is incomplete: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{ckpt_dir}: checkpoint is truncated: {rel} has "
                                  f"{f.stat().st_size} bytes, expected {size}")
    return marker


# -- save helpers ---------------------------------------------------------------------


def _quantize(staged: dict[str, np.memmap], specs: Specs, mode: str, staging: Path,
              progress: bool) -> dict[str, np.memmap]:
    """The staged full-precision arrays with the linear layers' weights quantized, layer by
    layer (host memory: one layer's weight in float32). specs: the quantized model's."""
    out, cpu = dict(staged), jax.local_devices(backend="cpu")[0]
    weights = quantized_weights(specs)
    layers = sum(staged[path].shape[0] for path in weights)
    bar = tqdm(total=layers, desc=f"quantizing to {mode}", unit="matrix", file=sys.stderr,
               disable=not progress)
    for path, axes in weights.items():
        w = staged[path]
        axes = tuple(a - 1 for a in axes)  # per layer: no stacked layer axis
        stem = staging / path.replace("/", ".")
        q = np.memmap(f"{stem}.q", dtype=STORAGE[mode], mode="w+", shape=w.shape)
        scale = np.memmap(f"{stem}.scale", dtype=np.float32, mode="w+",
                          shape=specs[path + SCALE][0])
        one = jax.jit(lambda x, a=axes: quantize(x, a, mode))
        for layer in range(w.shape[0]):  # on the host's CPU, whatever the accelerator
            q_layer, scale_layer = one(jax.device_put(np.asarray(w[layer]), cpu))
            q[layer], scale[layer] = np.asarray(q_layer), np.asarray(scale_layer)
            bar.update()
        out[path], out[path + SCALE] = q, scale
    bar.close()
    return out


def _stage(source: SourceCheckpoint, specs: Specs, staging: Path, dtype: np.dtype,
           progress: bool, float32=()) -> dict[str, np.memmap]:
    """Fill one memory-mapped array per parameter from the source's tensor stream, in dtype,
    or in float32 for the paths in `float32`."""
    staging.mkdir()
    arrays = {path: np.memmap(staging / f"{i}.bin", mode="w+", shape=shape,
                              dtype=np.float32 if path in float32 else dtype)
              for i, (path, (shape, _)) in enumerate(specs.items())}
    filled: dict[str, set[tuple[int, ...]]] = {path: set() for path in specs}
    bar = tqdm(total=source.num_tensors, desc=f"converting {source.path.name}", unit="tensor",
               file=sys.stderr, disable=not progress)
    with bar:
        for item in source.tensors():
            _put(arrays, filled, specs, item)
            bar.update()
    missing = [_label(path, index) for path, (shape, names) in specs.items()
               for index in np.ndindex(*shape[:_indexed(names)]) if index not in filled[path]]
    if missing:
        raise CheckpointError(f"{source.path}: no tensor for {len(missing)} parameter(s): "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for a in arrays.values():
        a.flush()
    return arrays


def _put(arrays: dict[str, np.memmap], filled: dict, specs: Specs, item: TensorItem) -> None:
    path, index, value = item
    index = () if index is None else index if isinstance(index, tuple) else (index,)
    label = _label(path, index)
    if path not in specs:
        raise CheckpointError(f"tensor {label}: not a parameter of this model")
    shape, names = specs[path]
    lead = shape[:_indexed(names)]
    if len(index) > len(lead) or (not index and lead) or \
            any(not 0 <= i < n for i, n in zip(index, lead, strict=False)):
        raise CheckpointError(f"tensor {label}: needs an index within {list(lead)} "
                              f"({', '.join(names[:len(lead)]) or 'none'})")
    target = arrays[path][index] if index else arrays[path]
    covered = {index + rest for rest in np.ndindex(*lead[len(index):])}
    if covered & filled[path]:
        raise CheckpointError(f"tensor {label}: given more than once")
    if tuple(value.shape) != target.shape:
        raise CheckpointError(f"tensor {label}: shape {tuple(value.shape)}, "
                              f"expected {target.shape}")
    target[...] = value
    filled[path] |= covered


def _label(path: str, index: tuple[int, ...]) -> str:
    """A parameter and its index in words: 'layers/moe/up_proj[layer 3, expert 5]'."""
    kinds = ("layer", "expert")
    return path if not index else \
        f"{path}[{', '.join(f'{k} {i}' for k, i in zip(kinds, index, strict=False))}]"


def _write_orbax(flat: dict[str, np.ndarray], params_dir: Path, progress: bool) -> None:
    """Write the staged arrays as one Orbax tree, a parameter at a time (Orbax's partial
    saves): host RAM holds one parameter's copy at a time. Saved whole, Orbax copied every
    array into memory first, twice the model's size at the peak."""
    session = params_dir.with_name(params_dir.name + "_partial").absolute()
    storage = ocp.v1.options.ArrayOptions.Saving.StorageOptions(chunk_byte_size=_CHUNK_BYTES)
    context = ocp.v1.Context(array_options=ocp.v1.options.ArrayOptions(
        saving=ocp.v1.options.ArrayOptions.Saving(storage_options=storage)))
    with context:
        for path in tqdm(flat, desc="writing params", unit="param", file=sys.stderr,
                         disable=not progress):
            ocp.v1.partial.save(session, nest_params({path: flat[path]}))
        ocp.v1.partial.finalize(session)
    # The session is a checkpoint of one PyTree, kept in its `_PYTREE` folder: that folder
    # is the tree `load` restores.
    tree = session / _PYTREE
    if not (tree / "_METADATA").is_file():
        raise CheckpointError(f"{session}: Orbax wrote no {_PYTREE}/ tree (an Orbax version "
                              "with another layout?)")
    tree.rename(params_dir)
    shutil.rmtree(session)


def _write_marker(ckpt_dir: Path, info: dict) -> None:
    files = {str(f.relative_to(ckpt_dir)): f.stat().st_size
             for f in sorted(ckpt_dir.rglob("*")) if f.is_file()}
    (ckpt_dir / MARKER).write_text(json.dumps({**info, "files": files}, indent=1))


class _ParamsSource:
    """A SourceCheckpoint over an in-memory params tree (for tests and random weights)."""

    default_dtype = "float32"

    def __init__(self, params: dict, config: ModelConfig):
        self.path = Path("params")
        self.config = config
        self._specs = param_specs(config)
        self._flat = _flatten(flax.core.meta.unbox(params))

    @property
    def num_tensors(self) -> int:
        return sum(np.shape(v)[0] if self._is_stacked(path) else 1
                   for path, v in self._flat.items())

    def tensors(self):
        for path, value in self._flat.items():
            value = np.asarray(value)
            if self._is_stacked(path):
                for i in range(value.shape[0]):
                    yield path, i, value[i]
            else:
                yield path, None, value

    def _is_stacked(self, path: str) -> bool:
        return path in self._specs and _indexed(self._specs[path][1]) > 0

    def write_tokenizer_assets(self, out_dir: Path) -> None:
        raise CheckpointError("an in-memory params tree has no tokenizer")


# -- tree helpers ---------------------------------------------------------------------


STACKED_AXES = ("layers", "dense_layers", "moe_layers")


def _indexed(names: tuple[str, ...]) -> int:
    """How many leading axes a source addresses by index: the stacked layer axis, and the
    experts of an MoE tensor."""
    if not names or names[0] not in STACKED_AXES:
        return 0
    return 2 if len(names) > 1 and names[1] == "expert" else 1


def _flatten(tree: dict, prefix: str = "") -> dict:
    """The inverse of _nest, for any leaf that is not a dict."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _stored_arrays(params_dir: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) from the Orbax metadata, without reading the arrays."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir.absolute())
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{params_dir}: unreadable Orbax metadata: {e}") from e
    meta = getattr(meta, "item_metadata", meta)  # StepMetadata in newer Orbax
    meta = getattr(meta, "tree", meta)
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in _flatten(dict(meta)).items()}
