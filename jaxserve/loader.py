"""From a Config to what the engine needs: model config, sharded params, tokenizer, mesh.

Sources that are not yet Orbax (demo, .gguf, Hugging Face directory) are converted once
into `checkpoint.path` (default: cache_dir/checkpoints/<model name>) and reused after.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import orbax_store
from jaxserve.checkpoint.convert import convert, open_source, source_identity
from jaxserve.checkpoint.demo import demo_gguf
from jaxserve.checkpoint.file_lock import exclusive, lock_path
from jaxserve.config import Config, make_dir
from jaxserve.engine.kv_memory import kv_budget
from jaxserve.engine.runner import check_cache, setup_compilation_cache
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.models.llama import (
    LlamaModel,
    _dummy_inputs,
    flatten_params,
    fuse_gate_up,
    fuse_qkv,
    nest_params,
    param_specs,
    split_layers,
    tile_q8_0,
    transpose_weights,
)
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.quant import SCALE, block_problem, quantize, quantized_weights
from jaxserve.tokenizer import Tokenizer, load_tokenizer
from sharding import rules
from sharding.mesh import MeshConfig, make_mesh
from sharding.pipeline import PipelinePlan, pad_layers
from sharding.tensor import TensorPlan, replicate_kv_heads


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model_config: ModelConfig  # the checkpoint's
    params: dict  # sharded; k/v projections hold plan.served_kv_heads heads
    tokenizer: Tokenizer | None
    mesh: jax.sharding.Mesh


def checkpoint_dir(config: Config, progress: bool = True,
                   check: Callable[[ModelConfig], None] | None = None) -> Path:
    """The converted checkpoint for this config, converting the source on first use;
    `check(model_config)` runs on the source's config before a conversion starts (a config
    that cannot serve the model fails before its weights are converted).

    Converted checkpoints are keyed by their source's identity (path, file sizes and times,
    conversion options): a changed or different source converts anew, never reusing
    another's weights, and a missing source is an error.
    """
    ck = config.checkpoint
    if ck.source == "demo":
        make_dir(ck.cache_dir, "checkpoint.cache_dir")
        src = demo_gguf(ck.cache_dir)
    else:
        src = Path(ck.source).expanduser()
        if not src.exists():
            raise CheckpointError(f"checkpoint.source: {ck.source} does not exist")
        if (src / orbax_store.MARKER).is_file():
            return src  # already a converted checkpoint
    identity = source_identity(src)
    out = ck.converted_path(config.model.name, identity)
    if _converted(out, identity, src, ck.path):
        return out
    make_dir(out.parent, "checkpoint.path" if ck.path else "checkpoint.cache_dir")
    # Processes started together (local.sh, servers sharing a cache) convert one at a time;
    # the others then find the checkpoint complete.
    with exclusive(lock_path(out), f"waiting for another process converting {src} -> {out}"):
        if not _converted(out, identity, src, ck.path):
            if check is not None:
                check(open_source(src).config)
            print(f"converting {src} -> {out} (once; later starts reuse it)", file=sys.stderr)
            convert(src, out, progress=progress, overwrite=out.exists())
    return out


def _converted(out: Path, identity: str, src: Path, given_path: str | None) -> bool:
    """Whether `out` holds a complete conversion of this source (identity)."""
    if not (out / orbax_store.MARKER).is_file():
        return False
    if orbax_store.check_complete(out).get("source_identity") == identity:
        return True
    if given_path:
        raise CheckpointError(
            f"checkpoint.path: {out} holds a conversion of another source (or of an "
            f"older version of {src}); remove it or choose another path")
    return False


def load_model(config: Config, progress: bool = True) -> LoadedModel:
    """Check the mesh against the devices and the model, then load the sharded weights.

    Every mesh problem is a ConfigError raised before any weight is read.
    """
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kv_budget(config, mesh.local_devices)  # a KV size these devices cannot take fails now
    if config.speculative.method == "draft":  # its config's errors, before this model loads
        from jaxserve.engine.draft import read_draft_config

        read_draft_config(config.speculative.draft_config)
    dtype = jnp.dtype(config.model.dtype)
    mode = config.model.quantization
    started = time.monotonic()
    # Making random weights, quantizing and splitting layers compile programs of their own:
    # with the cache on before them, a warm start loads those too instead of compiling.
    setup_compilation_cache(config.runner.compilation_cache_dir)
    if config.checkpoint.source == "random":
        model_config = random_model_config(config)
        tensor, pipeline = parallel_plans(model_config, config.mesh)
        check_quantization(config, model_config)
        check_layer_arrays(config, model_config)
        check_cache(config, model_config, mesh)
        # Random weights are made in the asked mode, so a quantized model never exists in
        # full precision (a 70B model in fp8 fits one GPU that its bf16 weights do not).
        model_config = dataclasses.replace(model_config, quantization=mode)
        params = random_params(model_config, dtype, mesh,
                               replicate=_held_whole(tensor, pipeline))
        directory = None
    else:
        def check(model_config: ModelConfig) -> None:  # a fresh source's, before converting
            check_context(config, model_config)
            parallel_plans(model_config, config.mesh)

        directory = checkpoint_dir(config, progress, check)
        model_config = orbax_store.read_config(directory)
        check_context(config, model_config)
        tensor, pipeline = parallel_plans(model_config, config.mesh)
        check_quantization(config, model_config)
        check_layer_arrays(config, model_config)
        check_cache(config, model_config, mesh)
        if progress:
            print(f"jaxserve: loading {model_config.num_params / 1e6:,.0f}M parameters "
                  f"from {directory} onto {mesh.devices.size} {jax.default_backend()} "
                  "device(s)", file=sys.stderr, flush=True)
        # Weights quantized below are restored as stored (a GGUF's float32), so they are
        # quantized from the source's own values: a Q8_0 GGUF gives back its own blocks.
        exact = frozenset(quantized_weights(param_specs(
            dataclasses.replace(model_config, quantization=mode)))) \
            if mode != model_config.quantization else frozenset()
        _, params = orbax_store.load(directory, mesh, dtype,
                                     replicate=_held_whole(tensor, pipeline), keep_dtype=exact)
    flat = flatten_params(params)
    if model_config.quantization != mode:  # a full-precision checkpoint, quantized now
        model_config = dataclasses.replace(model_config, quantization=mode)
        flat = quantize_params(flat, param_specs(model_config), mode, mesh,
                               _held_whole(tensor, pipeline))
    specs = param_specs(model_config)
    flat = pad_layers(flat, specs, pipeline, mesh, replicate=_held_whole(tensor, None))
    flat = replicate_kv_heads(flat, padded_specs(specs, pipeline), tensor, mesh)
    if config.runner.layer_arrays:
        flat = split_layers(flat, model_config.num_layers)
        # One GEMM for q/k/v, and one for gate/up (each device's own heads and columns
        # under tensor parallelism). Not for stacked layers: on the CPU demo (a layer scan)
        # the joined q/k/v weight made the B=1 step 2-3 ms slower. Column tiles (below)
        # split a weight's first output axis only, and a joined gate/up split over tensor
        # ranks is split on its second: there gate and up stay apart.
        flat = fuse_qkv(flat)
        if not (config.runner.q8_0_tiles and config.mesh.tensor > 1):
            flat = fuse_gate_up(flat)
        if config.runner.transposed_weights:
            flat = transpose_weights(flat)
        if config.runner.q8_0_tiles:
            flat = tile_q8_0(flat)
    tokenizer = load_tokenizer(directory) if directory is not None else None
    if progress:
        print(f"jaxserve: model ready in {time.monotonic() - started:.1f} s", file=sys.stderr,
              flush=True)
        hint = quantized_gpu_hint(config, jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
        if hint:
            print(hint, file=sys.stderr, flush=True)
    return LoadedModel(model_config, nest_params(flat), tokenizer, mesh)


def check_context(config: Config, model_config: ModelConfig) -> None:
    """A context longer than the model's positions (max_position_embeddings; a Mistral
    model's sliding window, which the converter caps it at) is refused: past it the output
    would quietly stop being the model's."""
    limit = model_config.max_position_embeddings
    if config.cache.max_model_len > limit:
        raise ConfigError(
            f"cache.max_model_len: {config.cache.max_model_len} is longer than the model's "
            f"context of {limit} positions (max_position_embeddings, or a sliding window); "
            f"set it to {limit} or less")


def quantized_gpu_hint(config: Config, platform: str, xla_flags: str) -> str | None:
    """One line for int8/fp8 weights served on a GPU without what makes their steps fast
    (docs/quantization.md, "On GPU"): per-layer weight arrays, and XLA's scratch at fixed
    addresses (without it XLA's CUDA-graph update can set the step). None otherwise, and
    for q8_0, which has not been measured on a GPU."""
    if config.model.quantization not in ("int8", "fp8") or platform != "gpu":
        return None
    missing = []
    if not config.runner.layer_arrays:
        missing.append("runner.layer_arrays: true")
    if "xla_gpu_command_buffer_update_mode" not in xla_flags:
        missing.append("XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP (with "
                       "cache.kv_cache_memory in bytes)")
    if not missing:
        return None
    return (f"jaxserve: note: {config.model.quantization} weights on a GPU run faster with "
            + " and ".join(missing) + "; see docs/quantization.md, \"On GPU\"")


def check_layer_arrays(config: Config, model_config: ModelConfig) -> None:
    """runner.layer_arrays needs every layer's weights on every device of one stage, and
    one kind of layer: ConfigError otherwise (before any weight is read)."""
    if not config.runner.layer_arrays:
        return
    if config.mesh.pipeline > 1:
        raise ConfigError(f"runner.layer_arrays: true cannot be used with mesh.pipeline="
                          f"{config.mesh.pipeline} (pipeline stages split the stacked layers)")
    if model_config.is_mixed:
        raise ConfigError(f"runner.layer_arrays: true cannot be used with {model_config.name}, "
                          "whose dense and MoE layers are stacked apart")
    if config.runner.layer_loop and model_config.is_moe:
        raise ConfigError(f"runner.layer_loop: true cannot be used with {model_config.name}: "
                          "its MoE layers are run unrolled (set it to false)")
    for key in ("transposed_weights", "q8_0_tiles"):  # they change the dense layers' layout
        if getattr(config.runner, key) and model_config.is_moe:
            raise ConfigError(f"runner.{key}: true cannot be used with {model_config.name}: "
                              "expert weights keep their layout (set it to false)")


def parallel_plans(model_config: ModelConfig,
                   mesh: MeshConfig) -> tuple[TensorPlan, PipelinePlan]:
    """What each device holds on this mesh; ConfigError when the model cannot take it."""
    c = model_config
    if mesh.expert > 1 and not c.is_moe:
        raise ConfigError(f"mesh.expert={mesh.expert}: {c.architecture} is a dense "
                          "model with no experts to shard")
    if c.is_moe and c.num_experts % mesh.expert:
        raise ConfigError(f"mesh.expert={mesh.expert}: num_experts={c.num_experts} is not "
                          f"divisible by expert={mesh.expert}")
    if c.is_mixed and mesh.pipeline > 1:
        raise ConfigError(f"mesh.pipeline={mesh.pipeline}: {c.architecture} mixes dense "
                          f"layers {list(c.dense_layers)} with MoE layers; such a model takes "
                          "no pipeline stages (use tensor, expert or data)")
    try:
        return (TensorPlan.for_model(model_config, mesh.tensor),
                PipelinePlan.make(model_config.num_layers, mesh.pipeline, mesh.pipeline_layers))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_quantization(config: Config, model_config: ModelConfig) -> None:
    """model.quantization against the checkpoint: a full-precision checkpoint can be
    quantized as it loads; a quantized one loads only in its own mode. And
    cache.kv_rotation against the model's head_dim."""
    mode, stored = config.model.quantization, model_config.quantization
    if stored != "none" and stored != mode:
        raise ConfigError(f"model.quantization: {mode} asked, but the checkpoint's linear "
                          f"layers are stored in {stored}; set model.quantization: {stored} "
                          "or convert the source again without --quantize")
    if mode == "q8_0" and (problem := block_problem(model_config, config.mesh.tensor)):
        raise ConfigError(f"model.quantization: {problem}")
    head_dim = model_config.head_dim
    if config.cache.kv_rotation and head_dim & (head_dim - 1):
        raise ConfigError(f"cache.kv_rotation: a Hadamard rotation needs a head_dim that is a "
                          f"power of two, but this model's head_dim is {head_dim}")


def quantize_params(flat: dict, specs: dict, mode: str, mesh,
                    replicate: frozenset[str] = frozenset()) -> dict:
    """Full-precision params on the mesh -> the linear layers quantized in place, each weight
    and its scale sharded by the rules (models/quant.py). specs: the quantized model's."""
    out = dict(flat)
    for path, axes in quantized_weights(specs).items():
        shardings = tuple(rules.sharding_for(names, shape, mesh, replicate)
                          for shape, names in (specs[path], specs[path + SCALE]))
        q = jax.jit(lambda w, a=axes: quantize(w, a, mode), out_shardings=shardings)
        out[path], out[path + SCALE] = q(flat[path])
    return out


def padded_specs(specs: dict, pipeline: PipelinePlan) -> dict:
    """Parameter specs with the stacked layer axis laid out as stages x slots."""
    rows = pipeline.stages * pipeline.slots
    return {path: ((rows, *shape[1:]) if names and names[0] == "layers" else shape, names)
            for path, (shape, names) in specs.items()}


def _held_whole(tensor: TensorPlan, pipeline: PipelinePlan | None) -> frozenset[str]:
    """Logical axes restored whole on every device, to be repeated or padded after: KV heads
    that will be replicated, and layers that do not split evenly over the stages."""
    names = set()
    if tensor.kv_replicas > 1:
        names.add("kv_heads")
    if pipeline is not None and pipeline.is_padded:
        names.add("layers")
    return frozenset(names)


def random_model_config(config: Config) -> ModelConfig:
    shape = config.checkpoint.random_shape
    if not shape:
        raise CheckpointError("checkpoint.source=random needs checkpoint.random_shape "
                              "(a model_config.json giving the shapes)")
    return ModelConfig.load(Path(shape).expanduser())


def random_params(model_config: ModelConfig, dtype, mesh,
                  replicate: frozenset[str] = frozenset()) -> dict:
    """Random weights (same shapes and bytes as real ones), created already sharded.

    The values depend only on the shapes (threefry is partitionable), not on the mesh.
    """
    specs = param_specs(model_config)
    shardings = rules.tree_shardings(specs, mesh, replicate)
    inputs = _dummy_inputs(model_config, 1, 1, 1)
    quantized = quantized_weights(specs)
    # The full-precision model's init gives every param but the quantized linear weights,
    # which are made below (its own linear weights are dead code, dropped by XLA).
    model = LlamaModel(dataclasses.replace(model_config, quantization="none"), dtype,
                       lambda q, *a, **k: q)
    kept = [path for path in specs if path not in quantized and
            not (path.endswith(SCALE) and path[:-len(SCALE)] in quantized)]

    def init(key):
        flat = flatten_params(model.init(key, *inputs)["params"])
        return {path: getattr(flat[path], "value", flat[path]) for path in kept}

    flat = jax.jit(init, out_shardings={path: shardings[path] for path in kept})(
        jax.random.key(0))
    for i, (path, axes) in enumerate(sorted(quantized.items())):
        shape, names = specs[path]
        make = functools.partial(_random_quantized, shape=shape, axes=axes, dtype=dtype,
                                 mode=model_config.quantization,
                                 stacked=bool(names) and names[0] == "layers")
        flat[path], flat[path + SCALE] = jax.jit(
            make, out_shardings=(shardings[path], shardings[path + SCALE]))(
                jax.random.fold_in(jax.random.key(1), i))
    return nest_params(flat)


def _random_quantized(key, *, shape, axes, dtype, mode, stacked):
    """A random linear weight made and quantized one layer at a time (no full-precision
    copy of the whole stack): (weight in the storage dtype, its scale)."""
    def one(k, shape=shape, axes=axes):
        return quantize(jax.random.normal(k, shape, dtype) * 0.02, axes, mode)
    if not stacked:
        return one(key)
    inner = tuple(a - 1 for a in axes)
    return jax.lax.map(lambda k: one(k, shape[1:], inner), jax.random.split(key, shape[0]))
