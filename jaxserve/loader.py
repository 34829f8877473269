"""From a Config to what the engine needs: model config, sharded params, tokenizer, mesh.

Sources that are not yet Orbax (demo, .gguf, Hugging Face directory) are converted once
into `checkpoint.path` (default: cache_dir/checkpoints/<model name>) and reused after.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import orbax_store
from jaxserve.checkpoint.convert import convert
from jaxserve.checkpoint.demo import demo_gguf
from jaxserve.config import Config
from jaxserve.errors import CheckpointError, ConfigError, JaxserveError
from jaxserve.models.llama import LlamaModel, _dummy_inputs, param_specs
from jaxserve.models.model_config import ModelConfig
from jaxserve.tokenizer import Tokenizer, load_tokenizer
from sharding import rules
from sharding.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model_config: ModelConfig
    params: dict
    tokenizer: Tokenizer | None
    mesh: jax.sharding.Mesh


def checkpoint_dir(config: Config, progress: bool = True) -> Path:
    """The converted checkpoint for this config, converting the source on first use."""
    ck = config.checkpoint
    source = ck.source
    if source != "demo" and (Path(source).expanduser() / orbax_store.MARKER).is_file():
        return Path(source).expanduser()
    out = ck.converted_path(config.model.name)
    if (out / orbax_store.MARKER).is_file():
        return out
    src = demo_gguf(ck.cache_dir) if source == "demo" else Path(source).expanduser()
    print(f"converting {src} -> {out} (once; later starts reuse it)", file=sys.stderr)
    convert(src, out, progress=progress)
    return out


def load_model(config: Config, progress: bool = True) -> LoadedModel:
    try:
        mesh = make_mesh(config.mesh)
        dtype = jnp.dtype(config.model.dtype)
        if config.checkpoint.source == "random":
            model_config = random_model_config(config)
            return LoadedModel(model_config, random_params(model_config, dtype, mesh), None,
                               mesh)
        directory = checkpoint_dir(config, progress)
        model_config, params = orbax_store.load(directory, mesh, dtype)
    except JaxserveError:
        raise
    except ValueError as e:  # the mesh does not fit the devices or the model's shapes
        raise ConfigError(f"mesh: {e}") from None
    return LoadedModel(model_config, params, load_tokenizer(directory), mesh)


def random_model_config(config: Config) -> ModelConfig:
    shape = config.checkpoint.random_shape
    if not shape:
        raise CheckpointError("checkpoint.source=random needs checkpoint.random_shape "
                              "(a model_config.json giving the shapes)")
    return ModelConfig.load(Path(shape).expanduser())


def random_params(model_config: ModelConfig, dtype, mesh) -> dict:
    """Random weights (same shapes and bytes as real ones), created already sharded."""
    specs = param_specs(model_config)
    shardings = rules.tree_shardings(specs, mesh)
    model = LlamaModel(model_config, dtype, lambda q, *a, **k: q)
    inputs = _dummy_inputs(model_config, 1, 1, 1)

    def init(key):
        params = model.init(key, *inputs)["params"]
        return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                            is_leaf=lambda x: hasattr(x, "names"))

    abstract = jax.eval_shape(init, jax.random.key(0))
    flat_paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    out_shardings = jax.tree_util.tree_unflatten(
        jax.tree.structure(abstract),
        [shardings["/".join(k.key for k in path)] for path, _ in flat_paths])
    return jax.jit(init, out_shardings=out_shardings)(jax.random.key(0))
