"""The MLP's gate/up product with SwiGLU: XLA's GEMM + fusion against the Mosaic GPU kernel
that does SwiGLU in its epilogue (pallas_kernels/swiglu_matmul_mgpu.py), on one GPU.

    python scripts/bench_swiglu_matmul.py --shape configs/shapes/llama3-8b.json \
        --tokens 512 2048 8192 --out X

For each token count M: h = silu(x Wg) * (x Wu), x [M, hidden], bfloat16, as 32 distinct
products (8 weights x 4 inputs). XLA runs the engine's form (x . gate_up [E, 2, F], then the
SwiGLU fusion), compiled as a prefill program is (`runner.step_compiler_options`: cuBLAS
only from 512 tokens); the kernel runs on the same weights, for each --tiles choice. Each
is timed by the device's kernels in a profiler trace (best of --rounds), its kernels named;
TFLOP/s counts 2 M E 2F. `max_err` is the largest difference from XLA's h over XLA's
largest |h|. Writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from trace_step import first_device, trace_events

from jaxserve.engine.runner import step_compiler_options
from pallas_kernels.swiglu_matmul_mgpu import Tiles, swiglu_matmul

WEIGHTS, INPUTS = 8, 4


def kernel_seconds(fn, pairs, rounds: int) -> tuple[float, dict]:
    """(Best seconds a product by the device's kernels, {kernel name: seconds a product})."""
    jax.block_until_ready([fn(*p) for p in pairs[:2]])
    best, names = float("inf"), {}
    for _ in range(rounds):
        t = time.perf_counter()
        events = trace_events(lambda: jax.block_until_ready([fn(*p) for p in pairs]))
        wall = time.perf_counter() - t
        device = first_device(events)
        if device is None:  # CPU: no device timeline
            seconds, by_name = wall, {}
        else:
            kernels = [e for e in events if e["process"] == device]
            seconds = sum(e.get("dur", 0) for e in kernels) / 1e6
            by_name = {}
            for e in kernels:
                by_name[e["name"]] = by_name.get(e["name"], 0.0) + e.get("dur", 0) / 1e6
        if seconds / len(pairs) < best:
            best = seconds / len(pairs)
            names = {k: v / len(pairs) for k, v in by_name.items()}
    return best, names


def parse_tiles(text: str) -> Tiles:
    rows, cols, depth, stages, snake = (int(v) for v in text.split(":"))
    return Tiles(rows=rows, cols=cols, depth=depth, stages=stages, snake=snake)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="a configs/shapes/*.json file")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--tiles", nargs="+", default=["128:64:64:3:8"],
                    help="kernel tile choices rows:cols:depth:stages:snake")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    shape = json.loads(Path(args.shape).read_text())
    e, f = shape["hidden_size"], shape["intermediate_size"]
    keys = jax.random.split(jax.random.key(0), WEIGHTS + INPUTS)
    gate_up = [jax.random.normal(keys[i], (e, 2, f), jnp.bfloat16) * 0.02
               for i in range(WEIGHTS)]
    rows = []
    for m in args.tokens:
        xs = [jax.random.normal(keys[WEIGHTS + i], (m, e), jnp.bfloat16) for i in range(INPUTS)]

        def xla_mlp(x, w):
            both = jnp.einsum("TE,EGF->TGF", x, w)
            return jax.nn.silu(both[:, 0]) * both[:, 1]

        xla = jax.jit(xla_mlp).lower(xs[0], gate_up[0]).compile(
            step_compiler_options(jax.devices()[0].platform, m))
        pairs = [(x, w) for w in gate_up for x in xs]
        ref = np.asarray(xla(xs[0], gate_up[0]), np.float32)
        seconds, names = kernel_seconds(xla, pairs, args.rounds)
        flops = 2 * m * e * 2 * f
        row = {"tokens": m, "xla": {"us": seconds * 1e6, "tflops": flops / seconds / 1e12,
                                    "kernels_us": {k: v * 1e6 for k, v in names.items()}},
               "kernel": []}
        print(m, "xla", round(seconds * 1e6, 1), "us", round(flops / seconds / 1e12), "TF/s",
              flush=True)
        for text in args.tiles:
            tiles = parse_tiles(text)
            kpairs = pairs

            def run(x, w, tiles=tiles):
                return swiglu_matmul(x, w, tiles)

            try:
                out = np.asarray(run(xs[0], gate_up[0]), np.float32)
                seconds, names = kernel_seconds(run, kpairs, args.rounds)
            except Exception as err:  # noqa: BLE001 - a tile choice that does not compile
                row["kernel"].append({"tiles": text, "error": f"{type(err).__name__}: "
                                                              f"{str(err)[:300]}"})
                print(m, text, "error", type(err).__name__, str(err)[:300], flush=True)
                continue
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            row["kernel"].append({"tiles": text, "us": seconds * 1e6,
                                  "tflops": flops / seconds / 1e12,
                                  "vs_xla": seconds / (row["xla"]["us"] / 1e6),
                                  "max_err": err})
            print(m, text, round(seconds * 1e6, 1), "us", round(flops / seconds / 1e12),
                  "TF/s", "vs xla", round(seconds / (row["xla"]["us"] / 1e6), 3), "err",
                  f"{err:.2e}", flush=True)
        rows.append(row)
    result = {"benchmark": "swiglu-matmul",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "shape": args.shape, "products_per_timing": WEIGHTS * INPUTS, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
