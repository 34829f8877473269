"""MeshConfig -> jax.sharding.Mesh over (data, pipeline, tensor, expert)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.distributed import device_grid
from sharding.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    expert: int = 1
    # Layers per pipeline stage, in order; empty: balanced by the loader.
    pipeline_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for axis in MESH_AXES:
            if getattr(self, axis) < 1:
                raise ValueError(f"{axis}: must be >= 1 (got {getattr(self, axis)})")
        if self.pipeline_layers and len(self.pipeline_layers) != self.pipeline:
            raise ValueError(f"pipeline_layers: {len(self.pipeline_layers)} stages given for "
                             f"pipeline={self.pipeline}")

    @property
    def num_devices(self) -> int:
        return self.data * self.pipeline * self.tensor * self.expert

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in MESH_AXES)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A Mesh with Auto axes over the first `config.num_devices` devices; over several
    processes, every device of every process, tensor groups inside a host."""
    devices = list(jax.devices() if devices is None else devices)
    axes = ", ".join(f"{a}={n}" for a, n in zip(MESH_AXES, config.shape(), strict=True))
    if config.num_devices > len(devices):
        kinds = sorted({d.platform for d in devices})
        raise ValueError(
            f"mesh ({axes}) needs {config.num_devices} devices, but only {len(devices)} "
            f"{'/'.join(kinds)} devices are available"
        )
    if jax.process_count() > 1:
        if config.num_devices != len(devices):
            raise ValueError(f"mesh ({axes}) needs {config.num_devices} devices, but the "
                             f"{jax.process_count()} processes hold {len(devices)}: a "
                             "multi-process mesh must use every device")
        return Mesh(device_grid(dict(zip(MESH_AXES, config.shape(), strict=True)), MESH_AXES),
                    MESH_AXES)
    grid = np.array(devices[: config.num_devices]).reshape(config.shape())
    return Mesh(grid, MESH_AXES)
