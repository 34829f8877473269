"""The one sharding table covers every logical axis the model and cache use."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve.models.llama import param_specs
from jaxserve.models.model_config import ModelConfig
from sharding import rules
from sharding.mesh import MeshConfig, make_mesh

CFG = ModelConfig("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True)
CACHE_AXES = ("cache_layers", "cache_pages", "cache_page_slots", "kv_heads", "head_dim")


def test_every_logical_name_has_exactly_one_rule():
    names = [n for n, _ in rules.LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    used = {n for _, axes in param_specs(CFG).items() for n in axes[1]} | set(CACHE_AXES)
    untied = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8, tie_word_embeddings=False)
    used |= {n for _, axes in param_specs(untied).items() for n in axes[1]}
    assert used <= set(names)
    assert all(axis in (None, *rules.MESH_AXES) for _, axis in rules.LOGICAL_AXIS_RULES)


def test_tensor_parallel_shards_heads_and_mlp():
    mesh = make_mesh(MeshConfig(tensor=2, data=2))
    shardings = rules.tree_shardings(param_specs(CFG), mesh)
    assert shardings["layers/attn/q_proj/kernel"].spec == P(None, None, "tensor", None)
    assert shardings["layers/mlp/down_proj"].spec == P(None, "tensor", None)
    assert shardings["embedding"].spec == P("tensor", None)
    assert shardings["final_norm/scale"].spec == P(None,)


def test_indivisible_dimension_is_a_clear_error():
    mesh = make_mesh(MeshConfig(tensor=8))
    with pytest.raises(ValueError, match=r"kv_heads=2\) is not divisible by mesh axis tensor=8"):
        rules.sharding_for(("embed", "kv_heads"), (32, 2), mesh)


def test_mesh_needs_enough_devices():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(MeshConfig(tensor=16), devices=jax.devices()[:8])
