"""Benchmarks later prefill chunks (keys partly in the cache) on one Hopper GPU.

A chunk after a cached prefix reads its keys from the pages. Two kernels can take it: the
ragged paged kernel's prefill phase (Triton) and the Mosaic GPU paged prefill kernel
(`pallas_kernels/paged_prefill_mgpu.py`). For each case (sequences of `count x
new@context`: `new` query tokens at the end of `context` tokens), on the same data:
  ragged:  ragged_paged_attention, every sequence;
  mosaic:  paged_prefill_mgpu, every sequence (cases whose chunks all have 128+ tokens);
  step_off / step_on: the engine's attention function (`ragged_paged_attention_flash`) with
           the Mosaic kernel off (runner.paged_prefill: false) and on (chunks of 128+);
each as time per call and causal TFLOP/s (2 * 2 * H * D * keys attended). Each kernel is
checked against the jnp reference once.

  python scripts/bench_prefill_chunks.py [--page-size 16] [--out X]
JSON goes to --out, else $OUT/bench_prefill_chunks.json, else bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench_kernels import time_calls  # noqa: E402

from jaxserve.engine.runner import PAGED_MIN_CHUNK  # noqa: E402
from pallas_kernels import flash_prefill as fp  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402
from pallas_kernels import paged_prefill_mgpu as ppm  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B's attention
CASES = {  # name -> [(count, new tokens, context)]; 8192 rows per step at most
    "4x2048@4096": [(4, 2048, 4096)],
    "2x4096@8192": [(2, 4096, 8192)],
    "8x1024@2048": [(8, 1024, 2048)],
    "16x512@2048": [(16, 512, 2048)],
    "2x1024@8192+8x300@1500+32x1@2048": [(2, 1024, 8192), (8, 300, 1500), (32, 1, 2048)],
    # chunks of 128-511 tokens (went to the ragged kernel when the threshold was 512)
    "16x128@1024": [(16, 128, 1024)],
    "8x256@2048": [(8, 256, 2048)],
    "6x384@4096": [(6, 384, 4096)],
    "16x160@512": [(16, 160, 512)],
    "4x129@8192+64x1@2048": [(4, 129, 8192), (64, 1, 2048)],
    # no chunk of 128 or more: what the Mosaic kernel's (empty) call costs a step
    "24x100@1500+32x1@2048": [(24, 100, 1500), (32, 1, 2048)],
}


def make_step(groups, page, seed=0):
    seqs = [(new, ctx) for count, new, ctx in groups for _ in range(count)]
    num_tokens = sum(n for n, _ in seqs)
    pages_per_seq = -(-max(c for _, c in seqs) // page)
    key = jax.random.key(seed)
    kq, kk, kv, kt = jax.random.split(key, 4)
    shape = (1, 1 + len(seqs) * pages_per_seq, page, KV_HEADS, HEAD_DIM)
    tables = 1 + jax.random.permutation(kt, len(seqs) * pages_per_seq).astype(jnp.int32)
    step = dict(q=jax.random.normal(kq, (num_tokens, HEADS, HEAD_DIM), jnp.bfloat16),
                k_pages=jax.random.normal(kk, shape, jnp.bfloat16),
                v_pages=jax.random.normal(kv, shape, jnp.bfloat16), layer=jnp.int32(0),
                page_tables=tables.reshape(len(seqs), pages_per_seq),
                seq_lens=jnp.asarray([c for _, c in seqs], jnp.int32),
                query_start=jnp.asarray(np.concatenate([[0], np.cumsum([n for n, _ in seqs])]),
                                        jnp.int32))
    keys = sum(sum(range(c - n + 1, c + 1)) for n, c in seqs)
    return step, 2 * 2 * HEADS * HEAD_DIM * keys


def bench_case(name, groups, page):
    step, flops = make_step(groups, page)
    scale = HEAD_DIM ** -0.5
    num_tokens = step["q"].shape[0]
    zeros = jnp.zeros((num_tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    take = jnp.ones(step["seq_lens"].shape, bool)
    fns = {
        "ragged": functools.partial(pa.ragged_paged_attention, sm_scale=scale),
        "mosaic": lambda **a: ppm.paged_prefill_mgpu(
            **a, take=take, out=jnp.zeros_like(a["q"]), sm_scale=scale,
            max_items=-(-num_tokens // ppm.TILE_Q) + len(take)),
        "step_off": functools.partial(fp.ragged_paged_attention_flash, k_new=zeros,
                                      v_new=zeros, sm_scale=scale),
        "step_on": functools.partial(fp.ragged_paged_attention_flash, k_new=zeros,
                                     v_new=zeros, sm_scale=scale, min_chunk=PAGED_MIN_CHUNK),
    }
    with jax.default_matmul_precision("highest"):
        ref = pa.ragged_paged_attention_reference(**step, sm_scale=scale).astype(jnp.float32)
    row = {"case": name, "groups": groups, "tokens": num_tokens, "flops": flops}
    names = list(step)
    if min(new for _, new, _ in groups) < ppm.TILE_Q:  # the Mosaic kernel leaves those out
        del fns["ragged"], fns["mosaic"]
    for kernel, fn in fns.items():
        call = jax.jit(lambda *a, fn=fn: fn(**dict(zip(names, a, strict=True))))
        args = tuple(step.values())
        err = float(jnp.abs(call(*args).astype(jnp.float32) - ref).max())
        med, best = time_calls(call, [args])
        row[kernel] = {"time_us": med * 1e6, "tflops": flops / med / 1e12,
                       "best_tflops": flops / best / 1e12, "max_abs_err": err}
    if "mosaic" in row:
        row["mosaic_vs_ragged"] = row["ragged"]["time_us"] / row["mosaic"]["time_us"]
    row["step_on_vs_off"] = row["step_off"]["time_us"] / row["step_on"]["time_us"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    rows = []
    for name, groups in CASES.items():
        rows.append(bench_case(name, groups, args.page_size))
        r = rows[-1]
        alone = (f"ragged {r['ragged']['time_us']:8.1f} us ({r['ragged']['tflops']:5.1f} TF/s)  "
                 f"mosaic {r['mosaic']['time_us']:8.1f} us ({r['mosaic']['tflops']:5.1f} TF/s) "
                 f"{r['mosaic_vs_ragged']:.2f}x  err {r['mosaic']['max_abs_err']:.4f}  "
                 if "mosaic" in r else "")
        print(f"{name:34s} {alone}step off {r['step_off']['time_us']:8.1f} on "
              f"{r['step_on']['time_us']:8.1f} us {r['step_on_vs_off']:.2f}x  "
              f"err {r['step_on']['max_abs_err']:.4f}", flush=True)
    stamp = datetime.datetime.now(datetime.UTC)
    result = {"date": stamp.isoformat(timespec="seconds"), "device": device.device_kind,
              "jax": jax.__version__, "page_size": args.page_size, "heads": HEADS,
              "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rows": rows}
    if args.out:
        out = pathlib.Path(args.out)
    elif os.environ.get("OUT"):
        out = pathlib.Path(os.environ["OUT"]) / "bench_prefill_chunks.json"
    else:
        out = pathlib.Path("bench/results") / f"prefill-chunks-{stamp:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
