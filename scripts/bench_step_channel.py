"""The leader's cost of sending one step to the other processes (engine/multihost.py).

    python scripts/bench_step_channel.py --sends 3000 --out step-channel.json

One process starts JAX's coordination service on this machine (`jax.distributed`) and sends
--sends step messages through a StepChannel, as the leader does: a packed input buffer of
--ints int32 and --floats float32 entries, of which the first --changed ints move on by one
at every step (the positions; the page tables stay), so each travels as a small compressed
difference. Reported: the median and mean wall time of `send`, after --skip warm-up sends.
No follower reads: the leader never waits for one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
from jax._src import distributed

from jaxserve.engine.multihost import KEEP, Message, Op, StepChannel


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
    shape = (1, 1, args.ints + args.floats)
    channel = StepChannel(lambda bucket: shape, distributed.global_state.client, name="bench")
    buffer = np.zeros(shape, np.int32)  # the floats (zeros) after the ints
    buffer[0, 0, :args.ints] = np.random.default_rng(0).integers(0, 1000, args.ints)
    times = []
    for _ in range(args.sends):
        buffer[0, 0, :args.changed] += 1
        t = time.perf_counter()
        channel.send(Message(Op.STEP, (64, 16, 1), True, buffer))
        times.append(time.perf_counter() - t)
    jax.distributed.shutdown()
    timed = np.asarray(times[args.skip:])
    result = {"benchmark": "step-channel-send",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": platform.machine(), "jax": jax.__version__, "keep": KEEP,
              **{k: getattr(args, k) for k in ("sends", "skip", "ints", "floats", "changed")},
              "send_median_us": float(np.median(timed) * 1e6),
              "send_mean_us": float(timed.mean() * 1e6),
              "send_p90_us": float(np.percentile(timed, 90) * 1e6)}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
