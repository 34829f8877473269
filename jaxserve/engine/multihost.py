"""Leader and followers: process 0 schedules, every process runs the same steps.

Over several processes (sharding/distributed.py) the leader alone runs the scheduler, the
tokenizer and the gRPC server. Before each step it sends the other processes what they
need to run the same compiled step on the global mesh: a header (what to do, the bucket,
whether the step follows on from the previous one) and the step's packed host inputs.

The messages travel through the key-value store of JAX's own coordination service (the one
`jax.distributed.initialize` starts on process 0), one key per message, so there is no
transport of our own to configure, secure or keep alive. A first version sent them with
`multihost_utils.broadcast_one_to_all`, a collective on the devices: on GPUs each send then
waited for the previous step to finish on the device, and took 3.4-6 ms of an 8-10 ms
step (docs/multihost.md). The store is host to host and never waits on a device. A step
travels as its difference from the previous step of its bucket, compressed (below).

The leader does not wait for the followers to read: every step ends in a collective over
all processes (the sampled tokens are gathered), so no follower falls more than a step or
two behind. Message n is key `<channel>/<n // KEEP>/<n>`, and as the leader starts a
block of KEEP messages it deletes the block before last in one call: a delete costs about
as much as a write (154 and 169 µs on the CPU machine), so one per message would double
the store's work per step.

A follower that dies or hangs shows up on the leader as a step whose collective fails or
never completes; the server's watchdog (distributed.step_timeout_s) turns either into a
fault. While idle the leader pings every few seconds: a ping is a message and then one
small collective over every device, which returns only if every process is there.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import json
import zlib

import jax
import numpy as np
from jax._src import distributed  # the coordination service's client (no public handle yet)
from jax.experimental import multihost_utils

from jaxserve.config import Config
from jaxserve.errors import DeploymentError


class Op(enum.IntEnum):
    STEP = 1  # run one step: the packed input buffer follows
    WARM_UP = 2  # compile every bucket
    PING = 3  # nothing: the broadcast itself shows every process is there
    STOP = 4  # the leader is done: exit


@dataclasses.dataclass(frozen=True)
class Message:
    op: Op
    bucket: tuple[int, int, int, int] = (0, 0, 1, 1)  # tokens, sequences, rows per
    #                                                    sequence, decode steps
    continues: bool = False  # the step takes the previous step's sampled tokens
    buffer: np.ndarray | None = None  # int32 [D, P, n]: the step's packed inputs


_channels = itertools.count()  # every process makes its channels in the same order
KEEP = 256  # messages per block of keys; the store keeps one to two blocks
HEADER = 6 * 4  # bytes: op, the bucket's four numbers, continues (int32 each)
WAIT_MS = 60_000  # a follower's wait for the next message, renewed while the leader lives


class StepChannel:
    """The leader's per-step messages to every other process."""

    def __init__(self, buffer_shape, client=None, name: str | None = None):
        """buffer_shape(bucket) -> the shape of that bucket's packed input buffer;
        client: the store (default: jax.distributed's); name: the channel's keys' folder
        (default: the how-manyth channel this process makes, the same on every process)."""
        self._shape = buffer_shape
        self._client = client or distributed.global_state.client
        self._prefix = f"jaxserve/steps/{next(_channels) if name is None else name}/"
        self._count = 0  # messages sent (leader) or received (follower)
        self._last: dict[tuple[int, ...], np.ndarray] = {}  # per bucket: the last inputs

    @staticmethod
    def is_leader() -> bool:
        return jax.process_index() == 0

    def send(self, message: Message) -> None:
        header = np.array([message.op, *message.bucket, message.continues], np.int32)
        payload = header.tobytes()
        if message.op == Op.STEP:
            raw = np.ascontiguousarray(message.buffer, np.int32).ravel()
            payload += self._delta(message.bucket, raw)
        block, n = divmod(self._count, KEEP)
        if n == 0 and block >= 2:  # a follower is never more than a few messages behind
            self._client.key_value_delete(f"{self._prefix}{block - 2}")
        self._client.key_value_set_bytes(self._key(self._count), payload)
        self._count += 1
        if message.op == Op.PING:
            _all_here()

    def _key(self, n: int) -> str:
        return f"{self._prefix}{n // KEEP}/{n}"

    def receive(self) -> Message:
        key = self._key(self._count)
        while True:  # the leader pings while idle; the runtime ends us if it dies
            try:
                payload = self._client.blocking_key_value_get_bytes(key, WAIT_MS)
                break
            except Exception as e:  # noqa: BLE001 -- jaxlib raises its own error type
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._count += 1
        op, *bucket, continues = np.frombuffer(payload[:HEADER], np.int32).tolist()
        message = Message(Op(op), tuple(bucket), bool(continues))
        if message.op == Op.PING:
            _all_here()
        if message.op != Op.STEP:
            return message
        raw = self._undelta(message.bucket, payload[HEADER:])
        return dataclasses.replace(message, buffer=raw.reshape(self._shape(message.bucket)))

    # A step's inputs differ little from the previous step's in the same bucket (the page
    # tables, most of the bytes, change only at page boundaries), so each is sent as its
    # XOR with that one, compressed: mostly zeros, a few hundred bytes. Both ends keep the
    # last inputs of each bucket, and both see every message in the same order.
    def _delta(self, bucket, raw: np.ndarray) -> bytes:
        last = self._last.get(bucket)
        self._last[bucket] = raw
        return zlib.compress((raw if last is None else raw ^ last).tobytes(), 1)

    def _undelta(self, bucket, data: bytes) -> np.ndarray:
        raw = np.frombuffer(zlib.decompress(data), np.int32)
        last = self._last.get(bucket)
        self._last[bucket] = raw = raw if last is None else raw ^ last
        return raw


def _all_here() -> None:
    """A collective over every device: returns only once every process has joined it."""
    multihost_utils.broadcast_one_to_all(np.zeros(1, np.int32))


def config_digest(config: Config) -> bytes:
    """What every process must agree on: all but the per-process and leader-only sections."""
    shared = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("distributed", "server")}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).digest()


def check_same_config(config: Config) -> None:
    """DeploymentError on every process when some process was started with another config, or
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
        raise DeploymentError(f"process(es) {wrong} were told --num-processes "
                          f"{sorted({int(counts[i]) for i in wrong})}, but the deployment "
                          f"has {jax.process_count()} processes")
    differ = [i for i, d in enumerate(every) if not np.array_equal(d, every[0])]
    if differ:
        raise DeploymentError(f"process(es) {differ} were started with a config that differs "
                          "from process 0's (model, checkpoint, cache, scheduler, runner or "
                          "mesh); start every process with the same config")
