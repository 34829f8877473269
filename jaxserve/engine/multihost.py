"""Leader and followers: process 0 schedules, every process runs the same steps.

Over several processes (sharding/distributed.py) the leader alone runs the scheduler, the
tokenizer and the gRPC server. Before each step it sends the other processes what they
need to run the same compiled step on the global mesh: a header (what to do, the bucket,
whether the step follows on from the previous one) and the step's packed host inputs. The
messages travel by JAX's own `broadcast_one_to_all` (a collective over every device), so
there is no transport of our own to configure, secure or keep alive.

A follower that dies or hangs shows up on the leader as a collective that fails or never
completes; the server's watchdog (distributed.step_timeout_s) turns either into a fault.
While idle the leader pings every few seconds, so a lost follower is noticed without
traffic too.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxserve.config import Config
from jaxserve.errors import ConfigError


class Op(enum.IntEnum):
    STEP = 1  # run one step: payload (ints, floats) follows
    WARM_UP = 2  # compile every bucket
    PING = 3  # nothing: the broadcast itself shows every process is there
    STOP = 4  # the leader is done: exit


@dataclasses.dataclass(frozen=True)
class Message:
    op: Op
    bucket: tuple[int, int] = (0, 0)
    continues: bool = False  # the step takes the previous step's sampled tokens
    ints: np.ndarray | None = None
    floats: np.ndarray | None = None


class StepChannel:
    """The leader's per-step messages to every other process."""

    def __init__(self, buffer_shapes):
        """buffer_shapes(bucket) -> (ints shape, floats shape) of that bucket's inputs."""
        self._shapes = buffer_shapes

    @staticmethod
    def is_leader() -> bool:
        return jax.process_index() == 0

    def send(self, message: Message) -> None:
        header = np.array([message.op, *message.bucket, message.continues], np.int32)
        multihost_utils.broadcast_one_to_all(header)
        if message.op == Op.STEP:
            multihost_utils.broadcast_one_to_all((message.ints, message.floats))

    def receive(self) -> Message:
        op, t, s, continues = multihost_utils.broadcast_one_to_all(np.zeros(4, np.int32))
        message = Message(Op(int(op)), (int(t), int(s)), bool(continues))
        if message.op != Op.STEP:
            return message
        ints_shape, floats_shape = self._shapes(message.bucket)
        ints, floats = multihost_utils.broadcast_one_to_all(
            (np.zeros(ints_shape, np.int32), np.zeros(floats_shape, np.float32)))
        return dataclasses.replace(message, ints=ints, floats=floats)


def config_digest(config: Config) -> bytes:
    """What every process must agree on: all but the per-process and leader-only sections."""
    shared = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("distributed", "server")}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).digest()


def check_same_config(config: Config) -> None:
    """ConfigError on every process when some process was started with another config, or
    was told another number of processes than the deployment has."""
    if jax.process_count() == 1:
        return
    told = config.distributed.resolved().num_processes or jax.process_count()
    mine = np.concatenate([np.frombuffer(config_digest(config), np.uint8).astype(np.int64),
                           [told]])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    counts = every[:, -1]
    wrong = [i for i, n in enumerate(counts) if n != jax.process_count()]
    if wrong:
        raise ConfigError(f"process(es) {wrong} were told --num-processes "
                          f"{sorted({int(counts[i]) for i in wrong})}, but the deployment "
                          f"has {jax.process_count()} processes")
    differ = [i for i, d in enumerate(every) if not np.array_equal(d, every[0])]
    if differ:
        raise ConfigError(f"process(es) {differ} were started with a config that differs "
                          "from process 0's (model, checkpoint, cache, scheduler, runner or "
                          "mesh); start every process with the same config")
