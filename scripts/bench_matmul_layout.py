"""Linear-layer matmuls of a model's shape in three layouts, on this machine's backend.

    python scripts/bench_matmul_layout.py --rows 1 4 16 32 64 256 1024 --out X.json

The chain of a decoder layer's matmuls (q/k/v joined, o, gate/up joined, down), run for
--layers layers by one loop body whose matmuls pick their layer's weight with lax.switch,
as runner.layer_loop runs them. For each row count M (tokens in the step), three forms:
  x.W      weights stored [inputs, outputs] (the checkpoint's layout), y = x [M, K] . W
  W.xT     weights stored [outputs, inputs], y^T = W [N, K] . x^T [K, M], the transposes of
           x and y held apart by optimization barriers (models/transposed.py, small M)
  x.WT     weights stored [outputs, inputs], y = x [M, K] . W [N, K]^T (large M)
Each form runs --reps times in --rounds alternating rounds; the JSON keeps every round's
median. runner.transposed_weights takes W.xT up to transposed.SMALL_ROWS rows, x.WT above.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

# SmolLM2-135M: hidden 576, 9 + 2 x 3 heads of 64 (q/k/v joined: 960), mlp 1536
SHAPES = dict(embed=576, qkv=960, mlp=1536)


def weights(layers: int, outputs_first: bool, seed: int = 0) -> list[dict]:
    e, q, f = SHAPES["embed"], SHAPES["qkv"], SHAPES["mlp"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        w = dict(qkv=(e, q), o=(e, e), gate_up=(e, 2 * f), down=(f, e))
        arrays = {}
        for name, (k, n) in w.items():
            a = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            arrays[name] = jnp.asarray(a.T.copy() if outputs_first else a)
        out.append(arrays)
    return out


def chain(form: str, layers: int):
    e, f = SHAPES["embed"], SHAPES["mlp"]

    def pick(ws, name, i, fn, operand):
        return jax.lax.switch(i, [functools.partial(fn, w[name]) for w in ws], operand)

    def matmul(ws, name, i, x):
        if form == "x.W":
            return pick(ws, name, i, lambda w, x: x @ w, x)
        if form == "x.WT":
            return pick(ws, name, i, lambda w, x: jnp.einsum("mk,nk->mn", x, w), x)
        xt = jax.lax.optimization_barrier(x.T)
        return jax.lax.optimization_barrier(pick(ws, name, i, lambda w, xt: w @ xt, xt)).T

    def run(h, ws):
        def body(i, h):
            q = matmul(ws, "qkv", i, h)[:, :e]
            h = h + matmul(ws, "o", i, q)
            gu = matmul(ws, "gate_up", i, h)
            return h + matmul(ws, "down", i, jax.nn.silu(gu[:, :f]) * gu[:, f:])
        return jax.lax.fori_loop(0, layers, body, h)

    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 256, 1024])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    inputs_first, outputs_first = weights(args.layers, False), weights(args.layers, True)
    forms = {"x.W": inputs_first, "W.xT": outputs_first, "x.WT": outputs_first}
    programs = {form: chain(form, args.layers) for form in forms}
    rows = []
    for m in args.rows:
        h = jnp.asarray(np.random.default_rng(m).standard_normal((m, SHAPES["embed"]))
                        .astype(np.float32))
        want = np.asarray(programs["x.W"](h, inputs_first))
        row = {"rows": m}
        for form, ws in forms.items():
            got = np.asarray(programs[form](h, ws))
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # the same sums
            row[form] = []
        for _ in range(args.rounds):
            for form, ws in forms.items():
                row[form].append(round(median_seconds(programs[form], h, ws, reps=args.reps)
                                       * 1000, 2))
        flops = 2 * m * sum(k * n for k, n in ((576, 960), (576, 576), (576, 3072), (1536, 576)))
        row["gflop_s_best"] = {form: round(flops * args.layers / min(row[form]) / 1e6, 1)
                               for form in forms}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "matmul-layout",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "machine": f"{platform.machine()}, {len(jax.devices())} device(s)",
        "layers": args.layers,
        "shapes": SHAPES,
        "unit": "ms per chain of all layers' matmuls, median of --reps, one per round",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
