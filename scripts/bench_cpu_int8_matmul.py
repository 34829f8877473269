"""The demo's matmuls on CPU with int8 weights: x split in two int8 parts times the int8
weight in an s8 x s8 -> s32 dot (int8 weights alone, the model's product on a CPU), the
weight converted to float32 before a float dot (the product before that), or x rounded once
to int8 (runner.int8_activations, here from one row); float32 beside them. All but the
converted form are the model's own product (qeinsum).

    python scripts/bench_cpu_int8_matmul.py --rows 1 2 4 16 --out X.json

30 layers of the demo's four matmul shapes (q/k/v 960 x 576, o 576 x 576, gate/up 3072 x
576, down 576 x 1536), random weights stored outputs-first and rounded per output channel
(absmax / 127), run in the model's form (W . x^T up to 32 rows, x . W^T above) in a
fori_loop whose matmuls pick their layer by lax.switch, as the demo's layer loop does. The
int8 activations take one absmax scale per row, computed in the step. Medians of --reps
calls, best of two passes; `max_rel_err` is the largest difference from the float32 run
over the largest float32 output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from jaxserve.models.quant import qeinsum, quantize
from jaxserve.models.transposed import Transposed, transposed_einsum

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q/k/v, o, gate/up, down
LAYERS = 30


def matmul(activation_rows: int):
    """The model's own product (models/quant.py's qeinsum) of x [rows, K] and a weight
    stored outputs-first [N, K]: float32 (no scale), int8 with x in two int8 parts
    (activation_rows 0), or int8 times int8 activations from `activation_rows` rows
    (runner.int8_activations)."""
    def run(w, scale, x):
        return qeinsum("tk,kn->tn", x, Transposed(w, 1, activation_rows), scale)
    return run


def converted(w, scale, x):
    """The int8 weight converted to float32 for a float dot, then scaled: qeinsum's product
    on a CPU before x was split in two int8 parts (as it still is on a GPU)."""
    y = transposed_einsum("tk,kn->tn", x, Transposed(w, 1), preferred_element_type=jnp.float32)
    return y * scale


def layer_loop(matmul):
    def run(weights, scales, x):
        def body(i, x):
            def pick(j, v):
                return jax.lax.switch(i, [lambda v, w=weights[n][j], s=scales[n][j]:
                                          matmul(w, s, v) for n in range(LAYERS)], v)
            h = jnp.tanh(pick(0, x))
            x = x + 0.1 * jnp.tanh(pick(1, h[:, :576]))
            g = jnp.tanh(pick(2, x))
            return x + 0.1 * jnp.tanh(pick(3, g[:, :1536] * g[:, 1536:]))
        return jax.lax.fori_loop(0, LAYERS, body, x)
    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w32 = [[jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05) for s in SHAPES]
           for _ in range(LAYERS)]
    none = [[None] * len(SHAPES) for _ in range(LAYERS)]
    q = [[quantize(w, (1,), "int8") for w in ws] for ws in w32]  # per output channel
    w8, s8 = [[a for a, _ in ws] for ws in q], [[s for _, s in ws] for ws in q]
    forms = {"float32_ms": (layer_loop(matmul(0)), w32, none),
             "int8_split_ms": (layer_loop(matmul(0)), w8, s8),
             "int8_converted_ms": (layer_loop(converted), w8, s8),
             "int8_activations_ms": (layer_loop(matmul(1)), w8, s8)}
    rows = []
    for n in args.rows:
        x = jnp.asarray(rng.standard_normal((n, 576), dtype=np.float32))
        ref = forms["float32_ms"][0](w32, none, x)
        row = {"rows": n}
        for _ in range(2):
            for name, (fn, w, s) in forms.items():
                t = median_seconds(fn, w, s, x, reps=args.reps) * 1e3
                row[name] = min(row.get(name, float("inf")), t)
        for name, (fn, w, s) in forms.items():
            err = jnp.max(jnp.abs(fn(w, s, x) - ref)) / jnp.max(jnp.abs(ref))
            row[name.replace("_ms", "_max_rel_err")] = float(err)
        rows.append(row)
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    result = {"benchmark": "cpu-int8-matmul",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "host": platform.node(),
              "jax": jax.__version__, "layers": LAYERS, "shapes": SHAPES, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
