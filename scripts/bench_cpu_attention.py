"""Attention of the plain-jnp reference (the CPU's attention), alone: decodes by batch and
context, and prefill chunks (fresh prompts, or after cached tokens).

    python scripts/bench_cpu_attention.py --batch 1 16 --context 147 1000 --out X.json
    python scripts/bench_cpu_attention.py ... --against OLD/pallas_kernels/paged_attention.py \
        --against-label COMMIT
    python scripts/bench_cpu_attention.py --prefill 16:128 1:1024 --batch --out X.json

B decode tokens, one per sequence, each sequence's context drawn from [C - 20, C + 40), its
pages spread over the demo's cache shape (30 layers, 364 pages of 16 tokens or as many as
the case needs, 3 KV heads of 64, 9 query heads). One jitted call runs the attention of all
30 layers in a loop, each layer's query depending on the last layer's output, as the layer
loop runs them. Medians of --reps calls, the versions alternating. `--against` times
another version of paged_attention.py (an older checkout's) in the same process and checks
that both give the same output.

`--prefill N:L[:H]` times N prefill chunks of L tokens each, after H tokens already in the
cache (default 0: fresh prompts), packed in a bucket of the next power of two, each layer's
keys and values both in the pages and as this step's rows (k_new, v_new, as the model
passes them): `pages_ms` without the rows (the window formulation over gathered pages),
`rows_ms` with them (`_rows_windows`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pallas_kernels import paged_attention  # noqa: E402

LAYERS, PAGES, PAGE, KV_HEADS, HEAD_DIM, HEADS = 30, 364, 16, 3, 64, 9


def load(path: str):
    spec = importlib.util.spec_from_file_location("other_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def case(batch: int, context: int, seed: int):
    rng = np.random.default_rng(seed)
    seq_lens = rng.integers(context - 20, context + 40, batch).astype(np.int32)
    pages_per_seq = -(-int(seq_lens.max()) // PAGE)
    num_pages = max(PAGES, batch * pages_per_seq + 1)  # page 0 is the null page
    tables = np.zeros((batch, 2048 // PAGE), np.int32)  # the demo's max_model_len
    order = rng.permutation(np.arange(1, num_pages))
    for s in range(batch):
        tables[s, :pages_per_seq] = order[s * pages_per_seq:(s + 1) * pages_per_seq]
    shape = (LAYERS, num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k = jnp.asarray(rng.standard_normal(shape, np.float32))
    v = jnp.asarray(rng.standard_normal(shape, np.float32))
    q = jnp.asarray(rng.standard_normal((batch, HEADS, HEAD_DIM), np.float32))
    meta = (jnp.asarray(tables), jnp.asarray(seq_lens), jnp.arange(batch + 1, dtype=jnp.int32))
    return q, k, v, meta


def prefill_case(num_prompts: int, length: int, seed: int, history: int = 0):
    """num_prompts chunks of `length` tokens after `history` cached ones, their pages spread
    over the cache: (q, k, v, meta, slots), slots the (page, offset) of each token's K/V
    row."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-(history + length) // PAGE)
    num_pages = max(PAGES, num_prompts * pages_per_seq + 1)
    tables = np.zeros((16, 2048 // PAGE), np.int32)  # the demo's seq bucket and max_model_len
    order = rng.permutation(np.arange(1, num_pages))
    for s in range(num_prompts):
        tables[s, :pages_per_seq] = order[s * pages_per_seq:(s + 1) * pages_per_seq]
    tokens = num_prompts * length
    bucket = 1 << (tokens - 1).bit_length()
    seq_lens = np.zeros(16, np.int32)
    seq_lens[:num_prompts] = history + length
    query_start = np.full(17, tokens, np.int32)
    query_start[:num_prompts + 1] = np.arange(num_prompts + 1) * length
    pos = history + np.arange(bucket) % length  # padding rows: any slot, output dropped
    seq = np.minimum(np.arange(bucket) // length, num_prompts - 1)
    slots = (jnp.asarray(tables[seq, pos // PAGE]), jnp.asarray(pos % PAGE))
    shape = (LAYERS, num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k = jnp.asarray(rng.standard_normal(shape, np.float32))
    v = jnp.asarray(rng.standard_normal(shape, np.float32))
    q = jnp.asarray(rng.standard_normal((bucket, HEADS, HEAD_DIM), np.float32))
    meta = (jnp.asarray(tables), jnp.asarray(seq_lens), jnp.asarray(query_start))
    return q, k, v, meta, slots


def all_layers(attention, meta, slots=None):
    """One jitted call of the 30 layers' attention; with slots, each layer also gets its
    tokens' K/V rows (k_new, v_new) read from the pages."""
    def run(q, k, v):
        def layer(i, out):
            rows = {} if slots is None else dict(k_new=k[i, slots[0], slots[1]],
                                                  v_new=v[i, slots[0], slots[1]])
            return out + attention(q + out, k, v, i, *meta, sm_scale=HEAD_DIM ** -0.5, **rows)
        return jax.lax.fori_loop(0, LAYERS, layer, jnp.zeros_like(q))
    return jax.jit(run)


def time_versions(fns: dict, q, k, v, reps: int) -> tuple[dict, dict]:
    """Outputs and median seconds of each version, the versions alternating."""
    outs = {name: np.asarray(fn(q, k, v)) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(q, k, v).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return outs, {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 16],
                    help="decode batches (none with an empty --batch)")
    ap.add_argument("--context", type=int, nargs="+", default=[147, 1000])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--against", help="another paged_attention.py to time beside this one")
    ap.add_argument("--against-label", default="another version",
                    help="what --against is, for the JSON (a commit, say)")
    ap.add_argument("--prefill", nargs="*", default=[],
                    help="prefill: N:L[:H], N chunks of L tokens after H cached ones")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    versions = {"this": paged_attention.ragged_paged_attention_reference}
    if args.against:
        versions["against"] = load(args.against).ragged_paged_attention_reference
    rows = []
    for batch in args.batch:
        for context in args.context:
            q, k, v, meta = case(batch, context, seed=len(rows))
            fns = {name: all_layers(fn, meta) for name, fn in versions.items()}
            outs, times = time_versions(fns, q, k, v, args.reps)
            row = {"batch": batch, "context": context,
                   **{f"{name}_ms": round(t * 1e3, 3) for name, t in times.items()}}
            if args.against:
                np.testing.assert_allclose(outs["this"], outs["against"], rtol=1e-4, atol=1e-4)
                row["this_over_against"] = round(row["this_ms"] / row["against_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for case_ in args.prefill:
        num_prompts, length, *history = (int(x) for x in case_.split(":"))
        history = history[0] if history else 0
        q, k, v, meta, slots = prefill_case(num_prompts, length, len(rows), history)
        fns = {"pages": all_layers(versions["this"], meta),
               "rows": all_layers(versions["this"], meta, slots)}
        if args.against:
            fns["against"] = all_layers(versions["against"], meta)
        outs, times = time_versions(fns, q, k, v, args.reps)
        valid = num_prompts * length
        for name in fns:
            np.testing.assert_allclose(outs[name][:valid], outs["pages"][:valid],
                                       rtol=1e-4, atol=1e-4)
        row = {"prefill_prompts": num_prompts, "prompt_len": length, "history": history,
               **{f"{name}_ms": round(t * 1e3, 3) for name, t in times.items()},
               "rows_over_pages": round(times["rows"] / times["pages"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"benchmark": "cpu-reference-attention",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
              "against": args.against_label if args.against else None,
              "layers": LAYERS, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
