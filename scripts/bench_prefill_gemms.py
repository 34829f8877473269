"""A prefill step's GEMMs, XLA against cuBLAS through torch, on one GPU in one process.

    python scripts/bench_prefill_gemms.py --shape configs/shapes/llama3-8b.json \
        --tokens 512 2048 8192 --out X

For each token count M, the four matmuls of a layer of the shape (q/k/v joined, o, gate/up
joined, down: [M, K] x [K, N], bfloat16 in and out, as the engine's layer-array weights
run them) are timed as 32 distinct products a call (8 weights x 4 inputs, so nothing can
be computed once for two of them): XLA as one jitted product called on each pair, its
kernels' time from a profiler trace (a single program of all 32 ran 1.1-2.5x slower than
the engine's own prefill GEMMs of the same shapes); torch.matmul (cuBLAS) as 32 launches
between CUDA events (stream time, gaps between launches included), --reps of them, median;
best of --rounds either way. Same products, same GPU.
TFLOP/s is 2 M K N a product over its time. `scripts/trace_step.py --prefill` gives the
engine's own prefill step at the same M, whose matmul rate sets against these.
Without torch or a GPU the torch column is left out. Writes JSON.
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

WEIGHTS, INPUTS = 8, 4


def layer_gemms(shape: dict) -> dict[str, tuple[int, int]]:
    """name -> (K, N) of a layer's matmuls, q/k/v and gate/up joined as the engine runs them."""
    h, hd = shape["hidden_size"], shape["head_dim"]
    heads, kv = shape["num_heads"], shape["num_kv_heads"]
    inter = shape["intermediate_size"]
    return {"qkv": (h, (heads + 2 * kv) * hd), "o": (heads * hd, h),
            "gate_up": (h, 2 * inter), "down": (inter, h)}


def time_xla(m: int, k: int, n: int, rounds: int) -> tuple[float, str, list[str]]:
    """(Seconds a product, how it was timed, the names of the kernels it ran), XLA: one
    jitted product, called on each of the WEIGHTS x INPUTS pairs in turn (one program per
    product: no pass of XLA's can merge products that share an operand, as it may inside
    one program), the device's kernel time from a profiler trace, best of `rounds`. Without
    a device timeline (CPU), wall time and no kernel names."""
    keys = jax.random.split(jax.random.key(0), WEIGHTS + INPUTS)
    ws = [jax.random.normal(keys[i], (k, n), jnp.bfloat16) * 0.02 for i in range(WEIGHTS)]
    xs = [jax.random.normal(keys[WEIGHTS + i], (m, k), jnp.bfloat16)
          for i in range(INPUTS)]
    product = jax.jit(lambda x, w: x @ w)
    pairs = [(x, w) for w in ws for x in xs]
    jax.block_until_ready([product(x, w) for x, w in pairs[:2]])
    best, how, names = float("inf"), "wall", []
    for _ in range(rounds):
        t = time.perf_counter()
        events = trace_events(lambda: jax.block_until_ready([product(x, w) for x, w in pairs]))
        wall = time.perf_counter() - t
        device = first_device(events)
        if device:
            how = "kernels"
            kernels = [e for e in events if e["process"] == device]
            seconds = sum(e.get("dur", 0) for e in kernels) / 1e6
            names = sorted({e["name"] for e in kernels})
        else:
            seconds = wall
        best = min(best, seconds / len(pairs))
    return best, how, names


def time_torch(m: int, k: int, n: int, reps: int, rounds: int) -> float | None:
    """Seconds a product, torch.matmul (cuBLAS) between CUDA events; None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
          for _ in range(WEIGHTS)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
          for _ in range(INPUTS)]

    def call():
        return [x @ w for w in ws for x in xs]

    call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            del out
        best = min(best, float(np.median(times)))
    return best / (WEIGHTS * INPUTS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, help="a configs/shapes/*.json file")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="time XLA only")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    shape = json.loads(Path(args.shape).read_text())
    rows = []
    for m in args.tokens:
        for name, (k, n) in layer_gemms(shape).items():
            flop = 2 * m * k * n
            row = {"tokens": m, "gemm": name, "k": k, "n": n}
            xla, how, names = time_xla(m, k, n, args.rounds)
            row["xla_us"], row["xla_tflops"] = round(xla * 1e6, 2), round(flop / xla / 1e12, 1)
            row["xla_timed_by"], row["xla_kernels"] = how, names
            peer = None if args.no_torch else time_torch(m, k, n, args.reps, args.rounds)
            if peer is not None:
                row["torch_us"] = round(peer * 1e6, 2)
                row["torch_tflops"] = round(flop / peer / 1e12, 1)
                row["xla_over_torch_time"] = round(xla / peer, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        # a layer's four, in the proportions a prefill step runs them
        layer = [r for r in rows if r["tokens"] == m]
        flop = sum(2 * m * r["k"] * r["n"] for r in layer)
        summary = {"tokens": m, "gemm": "layer", "xla_tflops": round(
            flop / sum(r["xla_us"] for r in layer) / 1e6, 1)}
        if all("torch_us" in r for r in layer):
            summary["torch_tflops"] = round(flop / sum(r["torch_us"] for r in layer) / 1e6, 1)
        rows.append(summary)
        print(json.dumps(summary), flush=True)
    result = {"benchmark": "prefill-gemms",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "shape": args.shape,
              "products_per_call": WEIGHTS * INPUTS, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
