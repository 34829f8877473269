"""Decode-sized matmuls over 8-bit weights stored outputs-first, as XLA's GEMM runs them
in the engine (models/quant.py's qeinsum) in both of transposed_einsum's forms, against
bfloat16 weights as the engine stores them, in one process.

    python scripts/bench_8bit_decode_matmul.py --rows 1 8 32 64 128 --mode fp8 int8 --out X.json

One jitted call runs --layers layers of the Llama-3-8B shape's four matmuls (q/k/v joined
[6144 x 4096], o [4096 x 4096], gate/up joined [28672 x 4096], down [4096 x 14336]), each
layer with weights of its own, each matmul's input the last one's output (so they run in
order, as in a step): the weights' bytes exceed the L2 many times over. Paths: `xla`, the
engine's form for the device (on a GPU x . W^T at every row count), `xla W.x^T` (the CPU's
form for up to SMALL_ROWS rows, forced), `xla x.W^T` (forced), and with --fp8-activations
`fp8 x fp8`: x quantized to fp8 per token (runner.fp8_activations' product, which the
engine takes from 128 rows), and with --reduce-rows R, for up to R rows, `reduce`: the
product as a multiply-add reduction over the contraction (bf16 weights too, as
`bf16 reduce_ms`). Rows report ms per call, the weights' bytes per second, the
floor (bytes over a sum's read bandwidth, measured here) and each path against `xla`; each
other path's output is checked against `xla`'s once per rows value.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from bench_kernels import time_calls  # noqa: E402
from timing import read_bandwidth  # noqa: E402

from jaxserve.models import transposed  # noqa: E402
from jaxserve.models.quant import STORAGE, qeinsum, quantize  # noqa: E402
from jaxserve.models.transposed import Transposed  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # [N, K] outputs-first


def weights(layers: int, mode: str, seed: int = 0):
    """Per layer, per matmul: (w [N, K] 8-bit, scale [N] float32), or bf16 w [K, N]."""
    key = jax.random.key(seed)
    out = []
    for _ in range(layers):
        row = []
        for n, k in SHAPES:
            key, sub = jax.random.split(key)
            w = jax.random.normal(sub, (n, k), jnp.bfloat16) * 0.02
            if mode == "bf16":
                row.append((jnp.asarray(w.T), None))
            else:
                q, s = quantize(w, (1,), mode)
                row.append((q.astype(STORAGE[mode]), s.astype(jnp.float32)))
        out.append(row)
    return out


def chain(matmul):
    """The layers' matmuls in order: each input is the last output's first K columns."""
    def run(x, layers):
        for row in layers:
            for (_, k), (w, s) in zip(SHAPES, row, strict=True):
                x = matmul(x[:, :k], w, s)
        return x
    return jax.jit(run)


def xla_8bit(x, w, s):
    return qeinsum("tk,kn->tn", x, Transposed(w, 1), s)


def forced(form: str):
    """qeinsum with transposed_einsum's form forced: W.x^T (the CPU's for up to
    SMALL_ROWS rows) or x.W^T."""
    def mm(x, w, s):
        engine_choice, transposed.rows_first = transposed.rows_first, lambda m: form == "x.W^T"
        try:  # the choice is made while jit traces
            return qeinsum("tk,kn->tn", x, Transposed(w, 1), s)
        finally:
            transposed.rows_first = engine_choice
    return mm


def fp8_activations(x, w, s):
    """runner.fp8_activations' product: x quantized to fp8 per token, fp8 x fp8."""
    return qeinsum("tk,kn->tn", x, Transposed(w, 1, activation_rows=1), s)


def bf16(x, w, s):
    return jnp.einsum("tk,kn->tn", x, w)


def reduce_8bit(x, w, s):
    """The product as a multiply-add reduction over K, not a dot: y^T [N, M] = sum_k
    W [N, 1, K] * x [1, M, K] in float32, the weight converted as it is read. Its rows
    (n, m) take n's weight row M times in a row, so HBM reads it once."""
    prod = w.astype(jnp.float32)[:, None, :] * x.astype(jnp.float32)[None, :, :]
    return (prod.sum(-1).T * s).astype(x.dtype)


def reduce_bf16(x, w, s):
    """bfloat16 weights [K, N] as the same reduction (for comparison with the GEMV)."""
    prod = w.T.astype(jnp.float32)[:, None, :] * x.astype(jnp.float32)[None, :, :]
    return prod.sum(-1).T.astype(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mode", nargs="+", default=["fp8"], choices=["fp8", "int8"])
    ap.add_argument("--fp8-activations", action="store_true",
                    help="also time fp8 weights by fp8 activations (runner.fp8_activations)")
    ap.add_argument("--reduce-rows", type=int, default=0,
                    help="also time the product as a multiply-add reduction (`reduce`) for "
                         "up to this many rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    bandwidth = read_bandwidth()
    per_layer = sum(n * k for n, k in SHAPES)
    base, bf16_chain, bf16_ms = weights(args.layers, "bf16"), chain(bf16), {}
    rows_out = []
    for mode in args.mode:
        layers = weights(args.layers, mode)
        paths = {"xla": chain(xla_8bit), **{f"xla {form}": chain(forced(form))
                                            for form in ("W.x^T", "x.W^T")}}
        if mode == "fp8" and args.fp8_activations:
            paths["fp8 x fp8"] = chain(fp8_activations)
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, 4096), jnp.bfloat16)
            ref = np.asarray(paths["xla"](x, layers[:1]), np.float32)
            if m not in bf16_ms:  # the same for every mode
                bf16_ms[m] = round(time_calls(bf16_chain, [(x, base)])[0] * 1e3, 4)
                if m <= args.reduce_rows:
                    bf16_ms[m, "reduce"] = round(
                        time_calls(chain(reduce_bf16), [(x, base)])[0] * 1e3, 4)
            row = {"mode": mode, "rows": m, "layers": args.layers, "bf16_ms": bf16_ms[m]}
            if m <= args.reduce_rows:
                row["bf16 reduce_ms"] = bf16_ms[m, "reduce"]
            for name, fn in {**paths, **({"reduce": chain(reduce_8bit)}
                                         if m <= args.reduce_rows else {})}.items():
                if name != "xla":
                    got = np.asarray(fn(x, layers[:1]), np.float32)
                    err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-9))
                    row[f"{name} max_rel_err"] = round(err, 5)
                t, _ = time_calls(fn, [(x, layers)])
                row[f"{name} ms"] = round(t * 1e3, 4)
                row[f"{name} TB/s"] = round(per_layer * args.layers / t / 1e12, 3)
            xla = row["xla ms"]
            for name in [*paths, *(["reduce"] if m <= args.reduce_rows else [])]:
                row[f"{name} vs xla"] = round(row[f"{name} ms"] / xla, 3)
            row["floor_ms"] = round(per_layer * args.layers / bandwidth * 1e3, 4)
            row["bf16_floor_ms"] = round(2 * per_layer * args.layers / bandwidth * 1e3, 4)
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "8bit-decode-matmul",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "read_bandwidth_TBs": bandwidth / 1e12,
              "command": " ".join(sys.argv), "shapes_NK": SHAPES, "rows": rows_out}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
