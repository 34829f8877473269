"""The one table from logical axis names (used by the model and the KV cache) to mesh axes.

Every logical name the model uses appears here exactly once; tests check it.
None means replicated along that logical axis.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "pipeline", "tensor", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("gate_up", None),  # the two halves of a joined gate/up weight (models/llama.py)
    ("layers", "pipeline"),
    # Mixture of experts: experts over `expert`, each expert's columns over `tensor`; the
    # router is replicated. A model mixing dense and MoE layers stacks each kind's MLP weights
    # on its own axis (held whole: such models take no pipeline stages).
    ("expert", "expert"),
    ("moe_mlp", "tensor"),
    ("router_experts", None),
    # q8_0 block scales (models/quant.py): a contracted axis in blocks of 32, split as it is
    ("embed_blocks", None),
    ("head_dim_blocks", None),
    ("mlp_blocks", "tensor"),
    ("moe_mlp_blocks", "tensor"),
    ("dense_layers", None),
    ("moe_layers", None),
    # KV cache axes: each data shard owns its own pages; each tensor rank its KV heads
    ("cache_layers", "pipeline"),
    ("cache_pages", "data"),
    ("cache_page_slots", None),
    # Step inputs, sampled tokens and per-request sampling tables: one block per data shard
    ("batch", "data"),
    # Per-stage blocks (each stage's micro-batch inputs, carried activations): one per stage
    ("stage", "pipeline"),
    # The vocabulary after the LM head's gather: every tensor rank samples from all of it
    ("sampled_vocab", None),
)

_RULES = dict(LOGICAL_AXIS_RULES)


def logical_to_spec(names: tuple[str, ...], mesh: Mesh,
                    replicate: frozenset[str] = frozenset()) -> PartitionSpec:
    """PartitionSpec for a tensor with these logical axis names on this mesh.

    A mesh axis of size 1 is dropped (replicated); so are the logical names in `replicate`.
    """
    axes = []
    for name in names:
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no entry in sharding/rules.py")
        axis = None if name in replicate else _RULES[name]
        axes.append(axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None)
    return PartitionSpec(*axes)


def sharding_for(names: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                 replicate: frozenset[str] = frozenset()) -> NamedSharding:
    """NamedSharding for an array; raises ValueError if a sharded dim does not divide evenly."""
    spec = logical_to_spec(names, mesh, replicate)
    for dim, (size, axis) in enumerate(zip(shape, spec, strict=True)):
        if axis is not None and size % mesh.shape[axis]:
            raise ValueError(
                f"dimension {dim} ({names[dim]}={size}) is not divisible by mesh axis "
                f"{axis}={mesh.shape[axis]}"
            )
    return NamedSharding(mesh, spec)


def tree_shardings(specs: dict, mesh: Mesh, replicate: frozenset[str] = frozenset()) -> dict:
    """{path: (shape, names)} -> {path: NamedSharding}."""
    return {k: sharding_for(names, shape, mesh, replicate) for k, (shape, names) in specs.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "logical_to_spec", "sharding_for",
           "tree_shardings", "replicated"]
