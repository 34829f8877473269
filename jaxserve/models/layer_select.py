"""Per-layer weights picked inside one loop body, used where they lie (runner.layer_loop).

In a loop over stacked weights (Flax's layer scan), XLA's CPU backend copies each layer's
weight out of the stack (`w[layer]`) before its matmul, so every weight byte is read twice
and written once per step. Weights kept as arrays of their own (runner.layer_arrays) have no
copies, but unrolled over the layers they make XLA compile and load every layer's code
apart (the demo on CPU: 3x the compile, 9x the loading of compiled programs).

`LayerSelect` stands for "layer i's weight" in one loop body run for every layer: a matmul
on it runs under `lax.switch` on the layer, each branch holding one layer's weight array
itself. Only the matmuls are per-layer code; the rest of the layer is compiled once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LayerSelect:
    arrays: tuple  # one weight per layer: the same shape and dtype
    index: jax.Array  # int32 scalar: the layer

    @property
    def shape(self) -> tuple[int, ...]:
        return self.arrays[0].shape

    @property
    def dtype(self):
        return self.arrays[0].dtype

    def apply(self, fn, *operands):
        """fn(the layer's weight, *operands), with no copy of the weight."""
        return jax.lax.switch(self.index, [functools.partial(fn, w) for w in self.arrays],
                              *operands)

    # Flax checks a parameter by the shape of its first leaf: the first layer's weight.
    def tree_flatten(self):
        return (*self.arrays, self.index), len(self.arrays)

    @classmethod
    def tree_unflatten(cls, count, leaves):
        return cls(tuple(leaves[:count]), leaves[count])


def is_matmul_weight(path: tuple[str, ...]) -> bool:
    """A parameter path (within a layer) that only matmuls read: `*_proj` weights and the
    projections' `kernel`s; scales, biases and norms are read elementwise."""
    return path[-1] == "kernel" or path[-1].endswith("_proj")


def layer_params(per_layer: list[dict], index: jax.Array) -> dict:
    """Layer `index`'s parameter tree, from every layer's tree (the same structure): its
    matmul weights as LayerSelect, the small rest picked out of a stack (a copy of a few
    kilobytes)."""
    def pick(path, *leaves):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if is_matmul_weight(names):
            return LayerSelect(tuple(leaves), index)
        return jnp.stack(leaves)[index]
    return jax.tree_util.tree_map_with_path(pick, *per_layer)
