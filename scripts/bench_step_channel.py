"""The leader's cost of sending one step to the other processes (engine/multihost.py).

    python scripts/bench_step_channel.py --sends 3000 --out step-channel.json

One process starts JAX's coordination service on this machine (`jax.distributed`) and sends
--sends step messages as the leader does: a packed input buffer of --ints int32 and
--floats float32 entries, of which the first --changed ints move on by one at every step
(the positions; the page tables stay), so each travels as a small compressed difference.
Two ways, alternating message by message:
  socket: the StepChannel the engine uses, over TCP to a follower process on this machine
          that reads and decodes every message;
  store:  the same message written to the coordination service's key-value store, one key
          per message, as the engine sent them before;
  encode: the same message made and dropped (the XOR with the last step, compression): the
          part of a send that is not the transport.
Reported: the median, mean and p90 wall time of a send, after --skip warm-up sends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax._src import distributed

from jaxserve.engine.multihost import Message, Op, StepChannel
from jaxserve.engine.step_socket import StepSocket


class StoreWrites:
    """A transport that writes each message to the key-value store under its own key."""

    def __init__(self, client):
        self.client, self.count = client, 0

    def send(self, payload: bytes) -> None:
        self.client.key_value_set_bytes(f"bench/store/{self.count}", payload)
        self.count += 1


class Introductions:
    """The two keys a StepSocket's introduction reads and writes, in memory (the socket's
    own sends are what is timed, not the introduction)."""

    def __init__(self, values=None):
        self.values = dict(values or {})
        self.changed = threading.Condition()

    def key_value_set_bytes(self, key, value):
        with self.changed:
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        with self.changed:
            self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000)
            return self.values[key]


def follower(values, shape, done):
    """A follower process: connects, reads and decodes every message until STOP."""
    end = StepSocket(Introductions(values), "bench/", process_index=1, num_processes=2,
                     leader_host="127.0.0.1")
    channel = StepChannel(lambda bucket: shape, end)
    received = 0
    while channel.receive().op != Op.STOP:
        received += 1
    end.close()
    done.put(received)


class Drop:
    def send(self, payload: bytes) -> None:
        pass


def stats(times, skip):
    t = np.asarray(times[skip:]) * 1e6
    return {"median_us": float(np.median(t)), "mean_us": float(t.mean()),
            "p90_us": float(np.percentile(t, 90))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sends", type=int, default=3000)
    ap.add_argument("--skip", type=int, default=500)
    ap.add_argument("--ints", type=int, default=6000)
    ap.add_argument("--floats", type=int, default=500)
    ap.add_argument("--changed", type=int, default=64)
    ap.add_argument("--port", type=int, default=8498)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=1,
                               process_id=0)
    client = distributed.global_state.client
    shape = (1, 1, args.ints + args.floats)
    intro, made = Introductions(), {}
    leader = threading.Thread(target=lambda: made.setdefault("end", StepSocket(
        intro, "bench/", process_index=0, num_processes=2, leader_host="127.0.0.1")))
    leader.start()
    values = {k: intro.blocking_key_value_get_bytes(k, 10_000)
              for k in ("bench/secret", "bench/port")}
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    reader = ctx.Process(target=follower, args=(values, shape, done))
    reader.start()
    leader.join()
    channels = {"socket": StepChannel(lambda bucket: shape, made["end"]),
                "store": StepChannel(lambda bucket: shape, StoreWrites(client)),
                "encode": StepChannel(lambda bucket: shape, Drop())}
    buffer = np.zeros(shape, np.int32)  # the floats (zeros) after the ints
    buffer[0, 0, :args.ints] = np.random.default_rng(0).integers(0, 1000, args.ints)
    times = {name: [] for name in channels}
    for _ in range(args.sends):
        buffer[0, 0, :args.changed] += 1
        for name, channel in channels.items():
            t = time.perf_counter()
            channel.send(Message(Op.STEP, (64, 16, 1, 1), True, buffer))
            times[name].append(time.perf_counter() - t)
    channels["socket"].send(Message(Op.STOP))
    received = done.get(timeout=60)
    reader.join()
    made["end"].close()
    jax.distributed.shutdown()
    assert received == args.sends, (received, args.sends)
    result = {"benchmark": "step-channel-send",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": platform.machine(), "jax": jax.__version__,
              **{k: getattr(args, k) for k in ("sends", "skip", "ints", "floats", "changed")},
              **{f"send_{name}": stats(t, args.skip) for name, t in times.items()}}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
