"""Where a start goes: importing, the device client, loading the weights, building the
engine, and each step program's trace, lowering, compile (or load from the persistent cache)
and first run.

    python scripts/profile_start.py --config configs/llama3-8b-random-serve-gpu.yaml --out X

Run it twice with the same `runner.compilation_cache_dir` (`--cache-dir` overrides the
config's) for a cold and a warm start. The gRPC server's own start adds binding the port
and the health service to these phases; `jaxserve serve` prints the two large ones
("model ready", "step programs ready").
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

IMPORTED_JAX = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--cache-dir", help="runner.compilation_cache_dir for this run")
    ap.add_argument("--out", help="write the phases as JSON here")
    args = ap.parse_args()

    phases = {"import_jax": IMPORTED_JAX - STARTED}
    t = time.perf_counter()
    devices = jax.devices()
    phases["device_client"] = time.perf_counter() - t

    t = time.perf_counter()
    from jaxserve.config import load_config
    from jaxserve.engine.engine import Engine
    from jaxserve.loader import load_model
    phases["import_jaxserve"] = time.perf_counter() - t

    config = load_config(args.config)
    if args.cache_dir:
        config = config.replace(runner__compilation_cache_dir=args.cache_dir)
    t = time.perf_counter()
    model = load_model(config, progress=False)
    jax.block_until_ready(model.params)
    phases["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    engine = Engine(config, model.model_config, model.params, model.tokenizer, model.mesh)
    phases["engine"] = time.perf_counter() - t
    t = time.perf_counter()
    engine.warm_up(progress=False)
    phases["warm_up"] = time.perf_counter() - t
    phases["total"] = time.perf_counter() - STARTED

    programs = {str(key): {k: round(v, 3) for k, v in times.items()}
                for key, times in engine.runner.compile_times.items()}
    for name, seconds in phases.items():
        print(f"{name:16s} {seconds:7.2f} s")
    for key, times in programs.items():
        print(f"  program {key}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    if args.out:
        result = {"script": "scripts/profile_start.py", "config": args.config,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "machine": f"{platform.machine()}, {len(devices)} JAX device(s), "
                             f"{devices[0].device_kind}",
                  "jax": jax.__version__,
                  "phases_s": {k: round(v, 3) for k, v in phases.items()},
                  "programs_s": programs}
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
