"""Several processes, one mesh: `jax.distributed` start-up and the multi-host device grid.

Every process of a deployment calls `initialize` first, before anything touches a device.
Process 0 leads (scheduler, tokenizer, gRPC); all processes run the same jitted steps on the
global mesh (multi-controller SPMD).

Where the coordinates come from, first found wins:
  1. explicit values (CLI flags or the config's `distributed:` section);
  2. LeaderWorkerSet's LWS_LEADER_ADDRESS, LWS_GROUP_SIZE, LWS_WORKER_INDEX;
  3. JAX's own cluster detection, when a cluster launcher is evident (an srun step of more
     than one task, Open MPI with more than one rank), where JAX_COORDINATOR_ADDRESS may
     name the coordinator; without a launcher JAX_COORDINATOR_ADDRESS stands for
     --coordinator-address, and the process count and id must be given too;
  4. none: one process, nothing to initialize.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import mesh_utils

DEFAULT_PORT = 8476  # coordinator port when only a host is known (LeaderWorkerSet)
# A week: JAX's distributed runtime takes the timeouts as 32-bit counts (in milliseconds,
# this still fits); .inf or 1e10 failed inside it with a TypeError or an OverflowError.
MAX_TIMEOUT_S = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None  # HOST:PORT of process 0's coordinator
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout_s: int = 60  # how long to wait for every process to join
    step_timeout_s: float = 30.0  # a step (or a liveness ping) longer than this is a fault
    step_port: int = 0  # the leader's port for step messages; 0: any free one (followers
    #                     learn it through the coordinator)

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes: must be >= 1 (got {self.num_processes})")
        if self.process_id is not None and self.num_processes is not None \
                and not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id: {self.process_id} is outside [0, "
                             f"{self.num_processes})")
        if self.init_timeout_s < 1 or self.step_timeout_s <= 0:
            raise ValueError("init_timeout_s and step_timeout_s: must be positive")
        if not self.init_timeout_s <= MAX_TIMEOUT_S or not self.step_timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"init_timeout_s and step_timeout_s: must be at most "
                             f"{MAX_TIMEOUT_S} s (got {self.init_timeout_s} and "
                             f"{self.step_timeout_s})")
        if not 0 <= self.step_port <= 65535:
            raise ValueError(f"step_port: {self.step_port} is not a TCP port (0: any free one)")
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"coordinator_address: {self.coordinator_address!r} is not "
                                 "HOST:PORT")

    def resolved(self, environ=os.environ) -> DistributedConfig:
        """These values, completed from LeaderWorkerSet's variables where unset."""
        if self.coordinator_address or "LWS_LEADER_ADDRESS" not in environ:
            return self
        return dataclasses.replace(
            self, coordinator_address=f"{environ['LWS_LEADER_ADDRESS']}:{DEFAULT_PORT}",
            num_processes=self.num_processes or int(environ["LWS_GROUP_SIZE"]),
            process_id=(self.process_id if self.process_id is not None
                        else int(environ["LWS_WORKER_INDEX"])))


def _cluster_launched(environ) -> bool:
    """A launcher started this program as one of several processes: srun (a job step of
    more than one task: a `salloc -n 2` shell has SLURM_NTASKS=2 too, but no step) or
    mpirun. (JAX's cluster detection gives the process count and id only under these.)"""
    srun_step = "SLURM_PROCID" in environ and "SLURM_STEP_NODELIST" in environ
    step_tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))
    return ((srun_step and int(step_tasks) > 1)
            or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(config: DistributedConfig, environ=os.environ) -> bool:
    """Join the deployment's processes; False when this is the only one.

    Raises ValueError (naming the flag) for values that cannot work, and RuntimeError when
    the processes do not all meet within `init_timeout_s`.
    """
    c = config.resolved(environ)
    if (c.coordinator_address is None and environ.get("JAX_COORDINATOR_ADDRESS")
            and not _cluster_launched(environ)):
        c = dataclasses.replace(c, coordinator_address=environ["JAX_COORDINATOR_ADDRESS"])
    explicit = (c.coordinator_address, c.num_processes, c.process_id)
    if all(v is None for v in explicit):
        if not _cluster_launched(environ):
            return False
        kwargs = {}
    else:
        if None in explicit:
            missing = [n for n, v in zip(("coordinator-address", "num-processes", "process-id"),
                                         explicit, strict=True) if v is None]
            raise ValueError(f"--{missing[0]} is missing: give --coordinator-address, "
                             "--num-processes and --process-id together")
        kwargs = dict(coordinator_address=c.coordinator_address,
                      num_processes=c.num_processes, process_id=c.process_id)
        if c.process_id != 0:  # JAX aborts the process on an unreachable coordinator
            _wait_for_coordinator(c.coordinator_address, c.init_timeout_s)
        else:  # and the leader on a host name that does not resolve, once it times out
            host = c.coordinator_address.rpartition(":")[0].strip("[]")
            try:
                socket.getaddrinfo(host, None)
            except OSError as e:
                raise ValueError(f"--coordinator-address {c.coordinator_address!r}: cannot "
                                 f"resolve {host!r} ({e.strerror or e})") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            **kwargs, initialization_timeout=c.init_timeout_s,
            # The runtime ends every process once a peer misses heartbeats this long; the
            # leader's own step watchdog (step_timeout_s) must fire first.
            heartbeat_timeout_seconds=int(c.step_timeout_s) + 30)
    except (RuntimeError, ValueError) as e:  # jaxlib reports a timeout as XlaRuntimeError
        raise RuntimeError(f"jax.distributed could not start with coordinator "
                           f"{c.coordinator_address}, {c.num_processes} processes, process id "
                           f"{c.process_id} within {c.init_timeout_s} s: "
                           f"{str(e).splitlines()[0]}") from None
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once process 0's coordinator accepts connections; RuntimeError after timeout."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator-address {address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach the coordinator {address} within "
                                   f"{timeout_s:g} s ({e.strerror or e}): is process 0 "
                                   "running there, and is the address right?") from None
            time.sleep(0.5)


def device_grid(shape: dict[str, int], axes: tuple[str, ...]) -> np.ndarray:
    """Devices arranged as `shape` over all processes. A host's devices go first to `tensor`
    and `expert` (their collectives need its fast links), then to `pipeline`, then to
    `data`, whose replicas talk least; what does not fit in one host spans hosts."""
    devices = jax.devices()
    sizes = [shape[a] for a in axes]
    if jax.process_count() == 1:
        return np.array(devices[:int(np.prod(sizes))]).reshape(sizes)
    local = jax.local_device_count()
    inner = [1] * len(sizes)
    room = local
    priority = ("tensor", "expert", "pipeline", "data")
    for i in sorted(range(len(axes)), key=lambda i: priority.index(axes[i])):
        inner[i] = np.gcd(sizes[i], room)
        room //= inner[i]
    if room != 1:
        named = ", ".join(f"{a}={n}" for a, n in zip(axes, sizes, strict=True))
        raise ValueError(f"mesh ({named}) does not split into {jax.process_count()} "
                         f"processes of {local} devices each")
    outer = [n // i for n, i in zip(sizes, inner, strict=True)]
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)
