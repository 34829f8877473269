"""Paged decode over quantized KV pages: bf16 pages against int8/fp8 pages with their scales.

    python scripts/bench_kv_quant.py --batch 1 8 32 --context 2048 8192 --out X

Issue 13 asks that an fp8 KV cache halve the KV share of a decode step at 8k context. The
step's KV share is its attention kernels, so this times `ragged_paged_attention` as the
engine calls it for a decode batch (one query token per sequence, `decode_only`), over
rotating page sets that defeat the L2, for each KV dtype and decode tiling given. Each row
reports the kernel's time, the bytes it must read (K/V, their float32 scales, q and the
output) per second, and the time against bf16 pages with the default tiling at the same
shape (`vs_bf16`: 0.5 is the target). --block-kv 0 (the default) is the kernel's own choice
for the page dtype. Every config is checked against the jnp reference
on the same quantized pages once before it is timed. 32 query heads over --kv-heads,
head_dim 128, pages of 16 tokens.

--head-major also times each config on the same bytes laid out head-major, each KV head's
16 keys of a page one contiguous run ([pages, KV heads, page_size, head_dim], 2 KiB in fp8
against 128 bytes per key), without changing the kernel: each (sequence, KV head) pair is
given to it as a sequence of its own with one KV head and its group of query heads, page p
of head h being page p * KV heads + h of a pool of one KV head. The kernel then runs the
same programs over the same keys (the split count follows rows x KV heads, the same
product), and only the addresses differ: a probe of the page layout (`layout` in the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repository, and bench_kernels beside this
from bench_kernels import L2_DEFEAT_BYTES, MAX_SETS, filled, guarded, time_calls  # noqa: E402

from jaxserve.models.quant import KV_STORAGE, quantize_vectors  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

Q_HEADS, HEAD_DIM, PAGE = 32, 128, 16
INTERPRET = jax.default_backend() == "cpu"  # a smoke run without a GPU
L2_BYTES = 0 if INTERPRET else L2_DEFEAT_BYTES  # KV touched before a page set repeats


def token_bytes(kv_dtype: str, kv_heads: int) -> int:
    """Bytes a decode reads per context token: K and V, and their scales if quantized."""
    if kv_dtype == "bf16":
        return 2 * kv_heads * HEAD_DIM * 2
    return 2 * kv_heads * (HEAD_DIM * KV_STORAGE[kv_dtype].itemsize + 4)


def make_pools(kv_dtype: str, kv_heads: int, num_pages: int, head_major: bool = False):
    """(k_pages, v_pages, k_scales, v_scales) for one layer; scales None for bf16. Head-major:
    a pool of one KV head whose page p * kv_heads + h is head h's part of page p."""
    shape = (1, num_pages * kv_heads, PAGE, 1, HEAD_DIM) if head_major else \
        (1, num_pages, PAGE, kv_heads, HEAD_DIM)
    k, v = filled(shape, jnp.bfloat16, 1), filled(shape, jnp.bfloat16, 2)
    if kv_dtype == "bf16":
        return k, v, None, None
    quant = jax.jit(functools.partial(quantize_vectors, mode=kv_dtype))
    (kq, ks), (vq, vs) = quant(k), quant(v)
    return kq, vq, ks, vs


def decode_args(batch: int, ctx: int, num_pages: int, n_sets: int, key):
    """n_sets (q, page_tables, seq_lens, query_start) over disjoint pages."""
    need = ctx // PAGE
    perm = np.asarray(jax.random.permutation(key, num_pages), np.int32)
    sets = []
    for s in range(n_sets):
        tables = perm[s * batch * need:(s + 1) * batch * need].reshape(batch, need)
        q = jax.random.normal(jax.random.fold_in(key, s), (batch, Q_HEADS, HEAD_DIM),
                              jnp.bfloat16)
        sets.append((q, jnp.asarray(tables), jnp.full((batch,), ctx, jnp.int32),
                     jnp.arange(batch + 1, dtype=jnp.int32)))
    return sets


def as_head_major(kv_heads: int, q, tables, lens, starts):
    """A decode batch's arguments with each (sequence, KV head) pair a sequence of its own
    over the head-major pool (`make_pools`): q [B * KVH, group, D], tables [B * KVH, P]."""
    batch = q.shape[0]
    q = q.reshape(batch * kv_heads, Q_HEADS // kv_heads, HEAD_DIM)
    heads = jnp.arange(kv_heads, dtype=jnp.int32)
    tables = (tables[:, None, :] * kv_heads + heads[None, :, None]).reshape(batch * kv_heads, -1)
    return (q, tables, jnp.repeat(lens, kv_heads),
            jnp.arange(batch * kv_heads + 1, dtype=jnp.int32))


def bench(kv_dtype: str, kv_heads: int, batches, contexts, block_sizes: pa.BlockSizes,
          head_major: bool = False):
    scale = HEAD_DIM ** -0.5
    per_token = token_bytes(kv_dtype, kv_heads)
    capacity = max(max(batches) * max(contexts), L2_BYTES // per_token)
    num_pages = -(-capacity // PAGE) + 1
    k, v, ks, vs = make_pools(kv_dtype, kv_heads, num_pages, head_major)
    pool_heads = 1 if head_major else kv_heads

    @jax.jit
    def kernel(q, k, v, ks, vs, tables, lens, starts):
        return pa.ragged_paged_attention(q, k, v, 0, tables, lens, starts, sm_scale=scale,
                                         block_sizes=block_sizes, k_scales=ks, v_scales=vs,
                                         decode_only=True, interpret=INTERPRET)

    @jax.jit
    def reference(q, k, v, ks, vs, tables, lens, starts):
        return pa.ragged_paged_attention_reference(q, k, v, 0, tables, lens, starts,
                                                   sm_scale=scale, k_scales=ks, v_scales=vs)

    rows = []
    for batch in batches:
        for ctx in contexts:
            key = jax.random.key(batch * 100003 + ctx)
            n_sets = max(1, min(MAX_SETS, -(-L2_BYTES // (batch * ctx * per_token)),
                                (num_pages - 1) // (batch * ctx // PAGE)))
            sets = decode_args(batch, ctx, num_pages, n_sets, key)
            if head_major:
                sets = [as_head_major(kv_heads, *args) for args in sets]
            q, tables, lens, starts = sets[0]
            resolved = block_sizes.resolve(group=Q_HEADS // kv_heads, num_seqs=q.shape[0],
                                           kv_heads=pool_heads, max_kv_len=ctx,
                                           kv_bytes=k.dtype.itemsize)
            row = {"kv_dtype": kv_dtype, "kv_heads": kv_heads, "batch": batch, "context": ctx,
                   "layout": "head-major" if head_major else "token-major",
                   "default_tiling": block_sizes == pa.BlockSizes(),
                   "block_kv_decode": resolved.block_kv_decode,
                   "num_stages_decode": block_sizes.num_stages_decode,
                   "num_warps_decode": block_sizes.num_warps_decode,
                   "num_kv_splits": resolved.num_kv_splits,
                   "decode_programs": block_sizes.decode_programs, "sets": n_sets}

            def check(args):
                out = kernel(*args).astype(jnp.float32)
                ref = reference(*args).astype(jnp.float32)
                return {"max_abs_err": float(jnp.max(jnp.abs(out - ref)))}

            row["check"] = guarded(functools.partial(
                check, (q, k, v, ks, vs, tables, lens, starts)))
            if "error" not in row["check"]:
                nbytes = batch * ctx * per_token + 2 * q.size * q.dtype.itemsize
                arg_sets = [(q_, k, v, ks, vs, t, n, s) for q_, t, n, s in sets]
                med, best = time_calls(kernel, arg_sets)
                row.update(time_us=round(med * 1e6, 2), best_us=round(best * 1e6, 2),
                           bytes=nbytes, tbps=round(nbytes / med / 1e12, 3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--kv-dtype", nargs="+", default=["bf16", "int8", "fp8"],
                    choices=["bf16", "int8", "fp8"])
    ap.add_argument("--block-kv", type=int, nargs="+", default=[0],
                    help="decode-phase keys per loop step (BlockSizes.block_kv_decode); 0: "
                         "the kernel's default for the page dtype")
    ap.add_argument("--stages", type=int, nargs="+", default=[2],
                    help="decode-phase pipeline stages (BlockSizes.num_stages_decode)")
    ap.add_argument("--warps", type=int, nargs="+", default=[4],
                    help="decode-phase warps (BlockSizes.num_warps_decode)")
    ap.add_argument("--decode-programs", type=int, nargs="+", default=[-1],
                    help="BlockSizes.decode_programs: the split-K programs wanted; 0: every "
                         "split runs; -1: the kernel's default")
    ap.add_argument("--head-major", action="store_true",
                    help="also time each config on the same pages laid out head-major")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for kv_dtype in args.kv_dtype:
        for bk in args.block_kv:
            for stages in args.stages:
                for warps, programs in itertools.product(args.warps, args.decode_programs):
                    bs = dataclasses.replace(pa.BlockSizes(), block_kv_decode=bk or None,
                                             num_stages_decode=stages, num_warps_decode=warps)
                    if programs >= 0:
                        bs = dataclasses.replace(bs, decode_programs=programs or None)
                    for head_major in (False, True)[:1 + args.head_major]:
                        rows += bench(kv_dtype, args.kv_heads, args.batch, args.context, bs,
                                      head_major)
    base = {(r["batch"], r["context"]): r["time_us"] for r in rows
            if r["kv_dtype"] == "bf16" and "time_us" in r and r["default_tiling"]
            and r["layout"] == "token-major"}
    for r in rows:
        b = base.get((r["batch"], r["context"]))
        if b and "time_us" in r:
            r["vs_bf16"] = round(r["time_us"] / b, 3)
    result = {"benchmark": "paged-decode-quantized-kv",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "q_heads": Q_HEADS,
              "head_dim": HEAD_DIM, "page_size": PAGE, "rows": rows}
    print(f"{'layout':11s} {'dtype':5s} {'bk':>4s} {'st':>3s} {'w':>2s} {'prog':>5s} {'B':>4s} "
          f"{'ctx':>6s} {'us':>9s} {'TB/s':>6s} {'vs bf16':>7s}")
    for r in rows:
        print(f"{r['layout']:11s} {r['kv_dtype']:5s} {r['block_kv_decode']:4d} "
              f"{r['num_stages_decode']:3d} "
              f"{r['num_warps_decode']:2d} {r['decode_programs'] or 0:5d} {r['batch']:4d} "
              f"{r['context']:6d} "
              f"{r.get('time_us', float('nan')):9.1f} {r.get('tbps', float('nan')):6.3f} "
              f"{r.get('vs_bf16', float('nan')):7.3f}")
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
