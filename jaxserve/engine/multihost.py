"""Leader and followers: process 0 schedules, every process runs the same steps.

Over several processes (sharding/distributed.py) the leader alone runs the scheduler, the
tokenizer and the gRPC server. Before each step it sends the other processes what they
need to run the same compiled step on the global mesh: a header (what to do, the bucket,
whether the step follows on from the previous one) and the step's packed host inputs.

The messages travel over one TCP connection from the leader to each other process
(step_socket.py); JAX's coordination service (the one `jax.distributed.initialize` starts
on process 0) only introduces them. A first version sent them with
`multihost_utils.broadcast_one_to_all`, a collective on the devices: on GPUs each send then
waited for the previous step to finish on the device, and took 3.4-6 ms of an 8-10 ms
step (docs/multihost.md). A second wrote each message to the coordination service's
key-value store: host to host, but a gRPC call of about 0.2 ms on the CPU machine and 0.8-1.3
ms on a GPU host. A step travels as the entries that changed since the previous step of
its bucket (below).

The leader does not wait for the followers to read: every step ends in a collective over
all processes (the sampled tokens are gathered), so no follower falls more than a step or
two behind, and a few steps' messages fit in a connection's buffers.

A follower that dies shows up on the leader as a send that fails, or as a step whose
collective fails or never completes; the server's watchdog (distributed.step_timeout_s)
turns each into a fault. While idle the leader pings every few seconds: a ping is a
message and then one small collective over every device, which returns only if every
process is there.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import json

import jax
import numpy as np
from jax._src import distributed  # the coordination service's client (no public handle yet)
from jax.experimental import multihost_utils

from jaxserve.config import Config
from jaxserve.engine.step_socket import StepSocket
from jaxserve.errors import DeploymentError


class Op(enum.IntEnum):
    STEP = 1  # run one step: the packed input buffer follows
    WARM_UP = 2  # compile every bucket
    PING = 3  # nothing: the broadcast itself shows every process is there
    STOP = 4  # the leader is done: exit


@dataclasses.dataclass(frozen=True)
class Message:
    op: Op
    bucket: tuple[int, int, int, int] = (0, 0, 1, 0)  # tokens, sequences, rows per
    #                                                    sequence, decode steps
    continues: bool = False  # the step takes the previous step's sampled tokens
    buffer: np.ndarray | None = None  # int32 [D, P, n]: the step's packed inputs


_channels = itertools.count()  # every process makes its channels in the same order
HEADER = 6 * 4  # bytes: op, the bucket's four numbers, continues (int32 each)
_WHOLE, _SPARSE = b"W", b"S"  # a step's inputs follow whole, or as the changed entries


class StepChannel:
    """The leader's per-step messages to every other process."""

    def __init__(self, buffer_shape, transport):
        """buffer_shape(bucket) -> the shape of that bucket's packed input buffer;
        transport: send(bytes) on the leader, receive() -> bytes on the others."""
        self._shape = buffer_shape
        self._transport = transport
        self._last: dict[tuple[int, ...], np.ndarray] = {}  # per bucket: the last inputs

    @classmethod
    def connect(cls, buffer_shape, *, port: int = 0, timeout_s: float = 60.0) -> StepChannel:
        """This process's end of a channel between the processes of jax.distributed:
        every process calls it at the same point (the channels are numbered)."""
        state = distributed.global_state
        host = state.coordinator_address.rpartition(":")[0].strip("[]")
        prefix = f"jaxserve/steps/{next(_channels)}/"
        # Processes load their weights at their own pace; after this barrier they meet the
        # introduction together, so its timeout measures the network, not the loading.
        multihost_utils.sync_global_devices(prefix)
        transport = StepSocket(state.client, prefix,
                               process_index=jax.process_index(),
                               num_processes=jax.process_count(), leader_host=host,
                               port=port, timeout_s=timeout_s)
        return cls(buffer_shape, transport)

    @staticmethod
    def is_leader() -> bool:
        return jax.process_index() == 0

    def send(self, message: Message) -> None:
        header = np.array([message.op, *message.bucket, message.continues], np.int32)
        payload = header.tobytes()
        if message.op == Op.STEP:
            raw = np.array(message.buffer, np.int32).ravel()  # a copy: kept as the last
            payload += self._delta(message.bucket, raw)
        self._transport.send(payload)
        if message.op == Op.PING:
            _all_here()

    def lost_peers(self) -> list[int]:
        """The leader's side: the processes whose connection has closed (they stopped)."""
        return self._transport.lost_peers()

    def receive(self) -> Message:
        payload = self._transport.receive()
        op, *bucket, continues = np.frombuffer(payload[:HEADER], np.int32).tolist()
        message = Message(Op(op), tuple(bucket), bool(continues))
        if message.op == Op.PING:
            _all_here()
        if message.op != Op.STEP:
            return message
        raw = self._undelta(message.bucket, payload[HEADER:])
        return dataclasses.replace(message, buffer=raw.reshape(self._shape(message.bucket)))

    # A step's inputs differ little from the previous step's in the same bucket (the page
    # tables, most of the bytes, change only at page boundaries), so a step travels as the
    # entries that changed (their indices, then their values) when that is smaller: a few
    # hundred bytes. On the CPU machine a 26 KB step with 64 changed entries is made in 20
    # µs this way, against 90 µs for the XOR compressed with zlib that the key-value
    # store's cost per KB once called for. Both ends keep the last inputs of each bucket,
    # and both see every message in the same order.
    def _delta(self, bucket, raw: np.ndarray) -> bytes:
        last = self._last.get(bucket)
        self._last[bucket] = raw
        if last is not None:
            changed = np.flatnonzero(raw != last).astype(np.int32)
            if 2 * changed.size < raw.size:
                return _SPARSE + changed.tobytes() + raw[changed].tobytes()
        return _WHOLE + raw.tobytes()

    def _undelta(self, bucket, data: bytes) -> np.ndarray:
        body = np.frombuffer(data, np.int32, offset=1)
        if data[:1] == _WHOLE:
            raw = body
        else:
            changed, values = np.split(body, 2)
            raw = self._last[bucket].copy()
            raw[changed] = values
        self._last[bucket] = raw
        return raw


def _all_here() -> None:
    """A collective over every device: returns only once every process has joined it."""
    multihost_utils.broadcast_one_to_all(np.zeros(1, np.int32))


def config_digest(config: Config) -> bytes:
    """What every process must agree on: all but the per-process and leader-only sections."""
    shared = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("distributed", "server")}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).digest()


def check_same_devices(timeout_s: float) -> None:
    """DeploymentError on every process when the processes hold different numbers of
    devices. The counts go through the coordinator's key-value store, not a collective (one
    over unequal device counts fails), and a barrier follows the reads, so no process leaves
    while another still needs the coordinator."""
    if jax.process_count() == 1:
        return
    client, ms = distributed.global_state.client, int(timeout_s * 1000)
    client.key_value_set(f"jaxserve/devices/{jax.process_index()}",
                         str(jax.local_device_count()))
    client.wait_at_barrier("jaxserve/devices/set", ms)
    counts = [int(client.blocking_key_value_get(f"jaxserve/devices/{i}", ms))
              for i in range(jax.process_count())]
    client.wait_at_barrier("jaxserve/devices/read", ms)
    if len(set(counts)) > 1:
        _refuse_together(f"the processes hold different numbers of devices (this one "
                         f"{jax.local_device_count()}, {sum(counts)} in all over "
                         f"{jax.process_count()} processes); give each the same number")


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
        _refuse_together(f"process(es) {wrong} were told --num-processes "
                         f"{sorted({int(counts[i]) for i in wrong})}, but the deployment "
                         f"has {jax.process_count()} processes")
    differ = [i for i, d in enumerate(every) if not np.array_equal(d, every[0])]
    if differ:
        _refuse_together(f"process(es) {differ} were started with a config that differs "
                         "from process 0's (model, checkpoint, cache, scheduler, runner or "
                         "mesh); start every process with the same config")


def _refuse_together(message: str) -> None:
    """DeploymentError(message), after leaving jax.distributed together: every process
    found the same problem, so all reach the shutdown barrier. Without it process 0 (which
    hosts the coordinator) could exit first, and JAX aborted a process still on its way
    out (SIGABRT, not the message)."""
    jax.distributed.shutdown()
    raise DeploymentError(message)
