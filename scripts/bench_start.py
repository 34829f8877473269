"""Start to SERVING: `jaxserve serve` started afresh, timed until its health check answers
SERVING, then stopped with SIGTERM; --rounds times in a row.

    python scripts/bench_start.py --config configs/smollm2-135m-cpu.yaml --rounds 3 --out X

The first round is cold only if the compiled programs are not cached yet (the config's
`runner.compilation_cache_dir`); the others are warm. Each round also records the server's
own lines ("model ready in", "step programs ready in").
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from jaxserve.server.client import Client

SERVING = 1  # grpc.health.v1 HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(config: str, timeout_s: float) -> dict:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxserve", "serve", "--config", config, "--port", str(port),
         "--metrics-port", "0", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client("127.0.0.1", port) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode}:\n"
                                       f"{server.stdout.read()}")
                if time.perf_counter() - started > timeout_s:
                    raise RuntimeError(f"not SERVING within {timeout_s} s")
                try:
                    if client.health(timeout=1.0) == SERVING:
                        break
                except Exception:  # not listening yet, or NOT_SERVING while warming up
                    pass
                time.sleep(0.05)
        serving_s = time.perf_counter() - started
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=120)
    row = {"serving_s": round(serving_s, 2), "exit_code": server.returncode}
    for key, pattern in (("model_ready_s", r"model ready in ([\d.]+) s"),
                         ("programs_ready_s", r"step programs ready in ([\d.]+) s")):
        found = re.search(pattern, out)
        row[key] = float(found.group(1)) if found else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to SERVING at most")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for _ in range(args.rounds):
        rows.append(one_start(args.config, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "start-to-serving",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "config": args.config, "rounds": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
