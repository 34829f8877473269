"""Decode attention of a whole step (every layer) under split-K choices and kernels, one GPU.

The engine's decode bucket has a static number of sequence rows S, of which a step fills
any number B, so one split-K choice must serve a full bucket and a nearly empty one. This
script times what the step spends in attention for each choice: a jitted loop over the
layers calls `ragged_paged_attention` on a [layers, pages, page_size, kv_heads, head_dim]
bf16 cache, B sequences of `ctx` (plus 0-63) tokens in a bucket of S rows and T = S token
rows, one query token each, pages scattered at random. Defaults: Llama-3-8B's attention
(32 layers, 32 q over 8 KV heads, head_dim 128) with max_model_len 2048 and pages of 16.

  python scripts/bench_split_k.py --cases 32:1:512 32:32:512 128:128:512 --out X.json
  python scripts/bench_split_k.py --smoke   # tiny shapes; interpret mode without a GPU

The Mosaic GPU kernel (`paged_decode_mgpu`, bf16/f16 pages, head_dim 64 or 128) runs in the
same call under its own choices (`--mosaic`: splits:block_kv:stages:consumers, 0 splits for
its automatic choice), output merge included.

Each row: ms per step (median and best of 5 rounds of 30 async calls), the K/V bytes read
over the best time (TB/s), and the largest difference of the outputs from the first
variant's. `auto` is the engine's choice: the static split count `BlockSizes.resolve` makes
for the bucket, of which the kernel runs as many as its `decode_programs` asks for the
filled rows (`--decode-programs` adds other targets; `all run` is the static count alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import paged_attention as pa  # noqa: E402
from pallas_kernels import paged_decode_mgpu as pdm  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    max_model_len: int = 2048

    @property
    def pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


SMOKE = Shape(layers=2, q_heads=4, kv_heads=2, head_dim=64, page_size=16, max_model_len=256)


def make_case(shape: Shape, num_rows: int, batch: int, ctx: int, seed: int = 0):
    """(q, k_pages, v_pages, page_tables, seq_lens, query_start) of one decode bucket."""
    rng = np.random.default_rng(seed)
    num_pages = num_rows * shape.pages_per_seq + 1  # page 0: the engine's null page
    kv = (shape.layers, num_pages, shape.page_size, shape.kv_heads, shape.head_dim)
    k_pages = jax.random.normal(jax.random.key(seed), kv, jnp.bfloat16)
    v_pages = jax.random.normal(jax.random.key(seed + 1), kv, jnp.bfloat16)
    tables = rng.permutation(np.arange(1, num_pages)).reshape(num_rows, shape.pages_per_seq)
    seq_lens = np.zeros(num_rows, np.int32)
    seq_lens[:batch] = np.minimum(ctx + rng.integers(0, 64, batch), shape.max_model_len)
    query_start = np.minimum(np.arange(num_rows + 1), batch).astype(np.int32)
    q = jax.random.normal(jax.random.key(seed + 2),
                          (num_rows, shape.q_heads, shape.head_dim), jnp.bfloat16)
    return (q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.asarray(seq_lens),
            jnp.asarray(query_start))


def step_attention(shape: Shape, variant, interpret: bool):
    """A jitted step's attention: every layer, outputs summed so none is dropped. variant:
    the Triton kernel's BlockSizes, or the Mosaic kernel's (splits, block_kv, stages,
    consumers)."""
    scale = shape.head_dim ** -0.5

    def attend(q, k_pages, v_pages, layer, tables, seq_lens, query_start):
        if isinstance(variant, pa.BlockSizes):
            return pa.ragged_paged_attention(
                q, k_pages, v_pages, layer, tables, seq_lens, query_start, sm_scale=scale,
                block_sizes=variant, interpret=interpret, decode_only=True)
        splits, block_kv, stages, consumers = variant
        return pdm.paged_decode_mgpu(
            q, k_pages, v_pages, layer, tables, seq_lens, query_start,
            jnp.ones(seq_lens.shape, bool), jnp.zeros_like(q), sm_scale=scale,
            num_splits=splits or None, block_kv=block_kv, stages=stages, consumers=consumers,
            interpret=interpret)

    @jax.jit
    def run(q, k_pages, v_pages, tables, seq_lens, query_start):
        total = jnp.zeros(q.shape, jnp.float32)
        for layer in range(shape.layers):
            out = attend(q, k_pages, v_pages, jnp.int32(layer), tables, seq_lens, query_start)
            total = total + out.astype(jnp.float32)
        return total
    return run


def time_ms(fn, args, *, calls: int, rounds: int = 5):
    fn(*args).block_until_ready()
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        out.block_until_ready()
        per_call.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(per_call), min(per_call)


def variants(shape: Shape, num_rows: int, batch: int, splits, stages, targets, mosaic):
    auto = pa.BlockSizes().resolve(group=shape.q_heads // shape.kv_heads, num_seqs=num_rows,
                                   kv_heads=shape.kv_heads,
                                   max_kv_len=shape.pages_per_seq * shape.page_size)
    k_auto, st_auto = auto.num_kv_splits, auto.num_stages_decode
    out = []
    for target in dict.fromkeys([auto.decode_programs, *targets]):
        run = int(pa.decode_splits(jnp.ones(batch), shape.kv_heads, k_auto, target))
        out.append((f"auto (splits {k_auto}, {run} run for {target} programs, stages "
                    f"{st_auto})", pa.BlockSizes(decode_programs=target)))
    out.append((f"auto, all run (splits {k_auto}, stages {st_auto})",
                pa.BlockSizes(decode_programs=None)))
    for k in splits:
        for st in stages:
            out.append((f"splits {k}, stages {st}",
                        pa.BlockSizes(num_kv_splits=k, num_stages_decode=st,
                                      decode_programs=None)))
    for k, block_kv, st, consumers in mosaic:
        if pdm.unsupported(jnp.bfloat16, jnp.bfloat16, shape.head_dim, shape.page_size,
                           shape.q_heads // shape.kv_heads, block_kv, st, consumers):
            continue
        blocks = -(-shape.max_model_len // block_kv)
        k_used = k or pdm.auto_splits(num_rows, shape.kv_heads, blocks)
        out.append((f"mosaic {'auto ' if not k else ''}(splits {k_used}, block_kv {block_kv}, "
                    f"stages {st}, consumers {consumers})", (k, block_kv, st, consumers)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["32:1:512", "32:32:512", "32:8:1800",
                                                       "128:128:512", "128:40:1800"],
                        help="S:B:ctx: bucket rows, sequences in it, context "
                             "(default: %(default)s)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3],
                        help="num_stages_decode values")
    parser.add_argument("--decode-programs", type=int, nargs="*", default=[],
                        help="more targets for the splits that run (BlockSizes."
                             "decode_programs) besides the default")
    parser.add_argument("--mosaic", nargs="*", default=["0:128:2:2", "0:64:2:1"],
                        help="Mosaic kernel variants splits:block_kv:stages:consumers, "
                             "splits 0 for its automatic choice (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads,
                        help="KV heads of the attention (32 query heads; default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; interpret mode when there is no GPU")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    if interpret and not args.smoke:
        parser.error("no GPU: run with --smoke for an interpret-mode plumbing check")
    if args.kv_heads < 1 or Shape.q_heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide {Shape.q_heads} query heads")
    shape = SMOKE if args.smoke else Shape(kv_heads=args.kv_heads)
    cases = ["4:1:100", "4:4:150"] if args.smoke else args.cases
    splits = [1, 2] if args.smoke else args.splits
    targets = [8] if args.smoke else args.decode_programs
    try:
        mosaic = [tuple(int(x) for x in m.split(":")) for m in args.mosaic]
        bad = any(len(m) != 4 for m in mosaic)
    except ValueError:
        bad = True
    if bad:
        parser.error(f"--mosaic {args.mosaic}: each must be splits:block_kv:stages:consumers")
    if args.smoke:
        mosaic = [(0, 64, 2, 1)]
    rows = []
    for case in cases:
        try:
            num_rows, batch, ctx = (int(x) for x in case.split(":"))
        except ValueError:
            parser.error(f"--cases {case!r} must be S:B:ctx, three integers")
        if not 0 < batch <= num_rows:
            parser.error(f"--cases {case!r}: B must be in 1..S")
        data = make_case(shape, num_rows, batch, ctx)
        kv_bytes = (int(np.sum(np.asarray(data[4]))) * shape.layers * shape.kv_heads
                    * shape.head_dim * 2 * 2)
        first = None
        for name, variant in variants(shape, num_rows, batch, splits, args.stages, targets,
                                      mosaic):
            fn = step_attention(shape, variant, interpret)
            out = fn(*data)
            first = out if first is None else first
            med, best = time_ms(fn, data, calls=1 if interpret else 30,
                                rounds=1 if interpret else 5)
            row = {"rows": num_rows, "batch": batch, "context": ctx, "variant": name,
                   "ms": round(med, 4), "best_ms": round(best, 4),
                   "kv_tb_per_s": round(kv_bytes / (best * 1e-3) / 1e12, 3),
                   "max_abs_diff": float(jnp.max(jnp.abs(out[:batch] - first[:batch])))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del data
    result = {"benchmark": "split_k", "device": jax.devices()[0].device_kind,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "jax_version": jax.__version__, "shape": dataclasses.asdict(shape),
              "interpret": interpret, "rows": rows}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
