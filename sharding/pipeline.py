"""Pipeline parallelism: which layers each stage holds, and the padded layer layout.

Stage p holds a contiguous run of layers. The stacked layer parameters and the KV cache's
layer axis are laid out as `stages x slots` (slots = the largest stage), stage p's layers
first in its block of slots, then zero layers if it holds fewer. A layer whose weights are
all zero is the identity on the residual stream (RMSNorm scales of zero make its attention
and MLP inputs zero, so both add zero), so a short stage runs as many layer slots as the
longest one. The pipeline's pace is set by its longest stage anyway; the padding costs the
memory of the zero layers, and none when the stages divide the layers evenly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sharding import rules


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    layers_per_stage: tuple[int, ...]  # real layers held by each stage, in order

    @property
    def stages(self) -> int:
        return len(self.layers_per_stage)

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_stage)

    @property
    def slots(self) -> int:
        """Layer slots per stage (the padded stage length)."""
        return max(self.layers_per_stage)

    @property
    def is_padded(self) -> bool:
        return self.slots * self.stages != self.num_layers

    @classmethod
    def make(cls, num_layers: int, stages: int, explicit: tuple[int, ...] = ()) -> PipelinePlan:
        """Balanced (earlier stages take the remainder) or the explicit split; ValueError
        naming the numbers when it cannot work."""
        if explicit:
            if len(explicit) != stages or sum(explicit) != num_layers or min(explicit) < 1:
                raise ValueError(
                    f"mesh.pipeline_layers={list(explicit)} must give each of the "
                    f"{stages} stages at least one layer and sum to num_layers={num_layers}")
            return cls(tuple(explicit))
        if stages > num_layers:
            raise ValueError(f"mesh.pipeline={stages}: more stages than num_layers={num_layers}")
        base, extra = divmod(num_layers, stages)
        return cls(tuple(base + (p < extra) for p in range(stages)))

    def padded_source(self) -> np.ndarray:
        """[stages * slots] int32: the checkpoint layer in each padded position (-1: zero)."""
        out = np.full(self.stages * self.slots, -1, np.int32)
        start = 0
        for p, n in enumerate(self.layers_per_stage):
            out[p * self.slots:p * self.slots + n] = np.arange(start, start + n)
            start += n
        return out


def pad_layers(params: dict, specs: dict, plan: PipelinePlan, mesh: Mesh,
               replicate: frozenset[str] = frozenset()) -> dict:
    """Lay stacked layer parameters out as stages x slots and shard them over `pipeline`.

    params: flat {path: array}; specs: {path: (shape, logical names)} of the checkpoint;
    replicate: logical axes still held whole (see sharding.rules). Arrays without a leading
    `layers` axis pass through untouched.
    """
    if not plan.is_padded:
        return params
    source = jnp.asarray(plan.padded_source())
    out = dict(params)
    for path, (shape, names) in specs.items():
        if not names or names[0] != "layers":
            continue
        padded = (plan.stages * plan.slots, *shape[1:])
        sharding = rules.sharding_for(names, padded, mesh, replicate)

        def place(x, src=source):
            rows = jnp.take(x, jnp.maximum(src, 0), axis=0)
            mask = (src >= 0).reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, rows, jnp.zeros((), x.dtype))

        out[path] = jax.jit(place, out_shardings=sharding)(params[path])
    return out
