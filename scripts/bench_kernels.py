"""Benchmarks the Pallas attention kernels on one GPU, in one command.

  copy:     device copy bandwidth (bytes read + written), the roofline for decode
  decode:   ragged_paged_attention, one query token per sequence, achieved TB/s on the
            bytes it must read (K/V of every sequence's context + q + out), B x context x
            GQA (32 q heads over 8 and 4 KV heads) x page size, head_dim 128, bf16;
            plus the jnp reference at one shape as a sanity baseline. Three timings:
            the full call, the decode kernel alone, and per layer in a step (the call of a
            decode-only program, decode_only=True, once per layer of a cache of up to 32
            layers, each layer's output the next one's query, in one jitted program, as
            the engine's decode steps run it; rows with B >= 32 and context >= 2k)
  prefill:  flash_attention (Triton), flash_attention_mgpu (Mosaic GPU) and the ragged paged
            kernel (B fresh prompts, K/V in pages) TFLOP/s (causal: 2*2*B*H*T*T*D/2) against
            jax.nn.dot_product_attention(implementation="cudnn") on the same data
Every kernel config is checked against a reference once before it is timed.

  python scripts/bench_kernels.py              # full sweep (~4-5 min on an H100)
  python scripts/bench_kernels.py --quick      # a few shapes
  python scripts/bench_kernels.py --autotune   # also sweep block sizes per shape class
  python scripts/bench_kernels.py --decode-only  # paged decode alone (~2 min on an H100)
  python scripts/bench_kernels.py --smoke      # tiny shapes (interpret mode without a GPU)
JSON goes to --out, else $OUT/bench_kernels.json, else bench/results/; a table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import flash_attention as fa  # noqa: E402
from pallas_kernels import flash_attention_mgpu as fam  # noqa: E402
from pallas_kernels import paged_attention as pa  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

GiB = 1 << 30
L2_DEFEAT_BYTES = 256 << 20  # rotate input sets until this much KV is touched (L2: 50 MB)
MAX_SETS = 64
DTYPE = jnp.bfloat16
# Rows that issue 12's paged-decode target covers, and its share of copy bandwidth.
TARGET_MIN_BATCH, TARGET_MIN_CONTEXT, TARGET_SHARE = 32, 2048, 0.85


@dataclasses.dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    kv_heads: tuple[int, ...]
    page_sizes: tuple[int, ...]
    page32_batches: tuple[int, ...]  # page size 32 only for these batches (compile budget)
    prefill_lens: tuple[int, ...]
    q_heads: int = 32
    head_dim: int = 128
    prefill_tokens: int = 16384  # B = prefill_tokens // T sequences per prefill call
    kv_cap_bytes: int = 40 * GiB
    copy_bytes: int = 2 * GiB
    reference_at: tuple[int, int, int, int] = (32, 2048, 8, 16)  # batch, ctx, kv_heads, page
    # --autotune shape classes (batch, ctx, kv_heads): small batch / long context, large batch
    autotune_decode: tuple[tuple[int, int, int], ...] = ((8, 8192, 8), (64, 2048, 4))
    # per-layer timing in a step: up to step_layers layers (the 8B shape's 32), as many as
    # fit step_pool_bytes, for rows of at least step_min_batch and step_min_context
    step_layers: int = 32
    step_pool_bytes: int = 12 * GiB
    step_min_batch: int = TARGET_MIN_BATCH
    step_min_context: int = TARGET_MIN_CONTEXT
    step_max_sets: int = 64


PLANS = {
    "full": Plan((1, 8, 32, 64, 128, 256), (512, 2048, 8192, 32768), (8, 4), (16, 32),
                 (32, 128), (1024, 2048, 4096, 8192, 16384)),
    "quick": Plan((1, 32, 128), (2048, 8192), (8,), (16,), (), (1024, 4096)),
    "smoke": Plan((2, 3), (64, 128), (2,), (16,), (), (64,), q_heads=8, head_dim=64,
                  prefill_tokens=128, kv_cap_bytes=64 << 20, copy_bytes=64 << 20,
                  reference_at=(2, 64, 2, 16), autotune_decode=((2, 128, 2),),
                  step_layers=2, step_pool_bytes=64 << 20, step_min_batch=0,
                  step_min_context=0, step_max_sets=2),
}


def time_calls(fn, arg_sets, *, carry=None, rounds=7, min_round_s=0.02):
    """(median, best) seconds per call: async dispatch over rotating arg sets per round.

    With `carry`, calls are carry = fn(*args, carry) (for a donated, in-place output).
    """
    def call(i, c):
        out = fn(*arg_sets[i % len(arg_sets)], *(() if c is None else (c,)))
        return out if c is not None else None, out

    c, out = carry, None
    for i in range(len(arg_sets)):
        c, out = call(i, c)
    jax.block_until_ready(out)
    t = time.perf_counter()
    c, out = call(0, c)
    jax.block_until_ready(out)
    once = time.perf_counter() - t
    inner = max(len(arg_sets), min(2000, math.ceil(min_round_s / max(once, 1e-6))))
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(inner):
            c, out = call(i, c)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t) / inner)
    return statistics.median(per_call), min(per_call)


def guarded(fn):
    """Runs one benchmark step; a failure is recorded in the results, not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a config that fails to lower/compile is a result
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def filled(shape, dtype, seed):
    """Non-constant device data written by one fused kernel (no large temporaries)."""
    def make():
        x = jnp.zeros(shape, jnp.float32)
        for axis, mul in enumerate((0.37, 1.3, 0.11, 0.73, 0.29)[: len(shape)]):
            x = x + jax.lax.broadcasted_iota(jnp.float32, shape, axis) * (mul + 0.01 * seed)
        return jnp.sin(x).astype(dtype)
    return jax.jit(make)()


def bench_copy(plan: Plan):
    x = filled((plan.copy_bytes // 4,), jnp.float32, 0)
    rows = {}
    for name, fn in (("copy", jax.jit(jnp.copy)), ("add_one", jax.jit(lambda a: a + 1.0))):
        med, best = time_calls(fn, [(x,)])
        rows[name] = {"time_us": med * 1e6, "tbps": 2 * plan.copy_bytes / med / 1e12,
                      "best_tbps": 2 * plan.copy_bytes / best / 1e12}
    rows["tbps"] = max(rows["copy"]["tbps"], rows["add_one"]["tbps"])
    # Per-call floor of this timing method: a tiny jitted op with as many arguments as the
    # attention call. Times near it are dispatch-bound, not kernel-bound.
    small = [jnp.ones((8, 8), jnp.float32) for _ in range(7)]
    med, _ = time_calls(jax.jit(lambda a, *rest: a * 2.0), [small])
    rows["dispatch_floor_us"] = med * 1e6
    return rows


# ---------------------------------------------------------------- paged decode


def kv_token_bytes(plan, kv_heads):
    return 2 * kv_heads * plan.head_dim * jnp.dtype(DTYPE).itemsize  # K and V


def decode_sets(plan, batch, ctx, page_size, pages_per_seq, num_pages, n_sets, key):
    """Arg tails (q, tables, seq_lens, query_start) for n_sets disjoint page sets."""
    need = ctx // page_size
    perm = np.asarray(jax.random.permutation(key, num_pages), np.int32)
    sets = []
    for s in range(n_sets):
        tables = np.zeros((batch, pages_per_seq), np.int32)
        tables[:, :need] = perm[s * batch * need:(s + 1) * batch * need].reshape(batch, need)
        q = jax.random.normal(jax.random.fold_in(key, s),
                              (batch, plan.q_heads, plan.head_dim), DTYPE)
        sets.append((q, jnp.asarray(tables), jnp.full((batch,), ctx, jnp.int32),
                     jnp.arange(batch + 1, dtype=jnp.int32)))
    return sets


def decode_check(kernel, reference, q, pools, tables, max_ctx, key):
    """Max |kernel - reference| on ragged lengths (masked tails, partial pages)."""
    batch = q.shape[0]
    lens = jax.random.randint(key, (batch,), 1, min(max_ctx, 4096) + 1, jnp.int32)
    args = (q, *pools, jnp.int32(0), tables, lens, jnp.arange(batch + 1, dtype=jnp.int32))
    err = jnp.abs(kernel(*args).astype(jnp.float32) - reference(*args).astype(jnp.float32))
    return float(err.max())


def decode_phase_only(batch, resolved, scale, interpret):
    """Just the decode-phase kernel(s) with precomputed work items and a donated output:
    the full call minus its zero fill, work-item math and the (empty) prefill launch."""
    def run(q, k_pages, v_pages, layer, tables, items, out):
        active = pa.decode_splits(items[pa._N], k_pages.shape[3], resolved.num_kv_splits,
                                  resolved.decode_programs)
        return pa._paged_phase(
            q, k_pages, v_pages, (), layer.reshape(1), active.reshape(1), tables, items, out,
            block_q=resolved.block_q_decode, block_kv=resolved.block_kv_decode,
            num_splits=resolved.num_kv_splits, num_warps=resolved.num_warps_decode,
            num_stages=resolved.num_stages_decode, scale=scale * pa.LOG2_E,
            interpret=interpret, name="bench_decode_phase")
    return jax.jit(run, donate_argnums=6)


@dataclasses.dataclass(frozen=True)
class DecodeSetup:
    """One compiled config and its KV pool, shared by all contexts that fit the pool."""

    plan: Plan
    batch: int
    kv_heads: int
    page_size: int
    pages_per_seq: int
    num_pages: int
    pools: tuple
    kernel: object
    step_kernel: object  # the kernel of a decode-only step program: no prefill launch
    reference: object
    phase_only: object
    key: jax.Array
    check_step: bool  # check the step timing's output against the reference, layer by layer


def decode_setup(plan, batch, kv_heads, page_size, max_ctx, resolved, block_sizes, interpret):
    token_bytes = kv_token_bytes(plan, kv_heads)
    capacity = max(batch * max_ctx, L2_DEFEAT_BYTES // token_bytes)
    num_pages = -(-capacity // page_size)
    shape = (1, num_pages, page_size, kv_heads, plan.head_dim)
    scale = plan.head_dim ** -0.5
    return DecodeSetup(
        plan, batch, kv_heads, page_size, max_ctx // page_size, num_pages,
        (filled(shape, DTYPE, 1), filled(shape, DTYPE, 2)),
        jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=scale,
                                  block_sizes=block_sizes, interpret=interpret)),
        jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=scale,
                                  block_sizes=block_sizes, interpret=interpret,
                                  decode_only=True)),
        jax.jit(functools.partial(pa.ragged_paged_attention_reference, sm_scale=scale)),
        decode_phase_only(batch, resolved, scale, interpret),
        jax.random.key(batch * 1000 + kv_heads * 10 + page_size), check_step=interpret)


def bench_decode_ctx(su: DecodeSetup, ctx, with_reference):
    """Timings at one context: full call, decode-phase kernel only, optional reference."""
    token_bytes = kv_token_bytes(su.plan, su.kv_heads)
    n_sets = max(1, min(MAX_SETS, -(-L2_DEFEAT_BYTES // (su.batch * ctx * token_bytes)),
                        su.num_pages // (su.batch * (ctx // su.page_size))))
    sets = decode_sets(su.plan, su.batch, ctx, su.page_size, su.pages_per_seq, su.num_pages,
                       n_sets, su.key)
    useful = su.batch * ctx * token_bytes + 2 * sets[0][0].size * sets[0][0].dtype.itemsize
    arg_sets = [(q, *su.pools, jnp.int32(0), t, lens, qs) for q, t, lens, qs in sets]
    row = {"context": ctx, "sets": n_sets, "bytes": useful}
    row.update(guarded(lambda: timing(su.kernel, arg_sets, useful)))
    rows_idx = jnp.arange(su.batch, dtype=jnp.int32)
    items = jnp.stack([rows_idx, rows_idx, jnp.ones_like(rows_idx), jnp.full_like(rows_idx, ctx)])
    phase_sets = [(q, *su.pools, jnp.int32(0), t, items) for q, t, _, _ in sets]
    out = jnp.zeros_like(sets[0][0])
    row["kernel_only"] = guarded(lambda: timing(su.phase_only, phase_sets, useful, carry=out))
    if with_reference:
        row["reference"] = guarded(lambda: timing(su.reference, arg_sets, useful))
    layers = step_layers(su.plan, su.batch, ctx, su.kv_heads)
    if layers:
        row["step"] = guarded(lambda: bench_decode_step(su, ctx, layers))
    return row


def step_layers(plan, batch, ctx, kv_heads):
    """Layers of the per-layer step timing for this row (0: not timed): up to
    plan.step_layers, as many as fit plan.step_pool_bytes, at least 2."""
    if batch < plan.step_min_batch or ctx < plan.step_min_context:
        return 0
    fit = plan.step_pool_bytes // (batch * ctx * kv_token_bytes(plan, kv_heads))
    layers = min(plan.step_layers, fit)
    return layers if layers >= 2 else 0


def decode_step(kernel, layers):
    """The decode attention of a step: `kernel` once per layer, layers base..base+layers-1
    of the cache, each layer's output the next one's query (so no layer can be skipped or
    overlapped), in one jitted program."""
    def run(q, k_pages, v_pages, base, tables, seq_lens, query_start):
        for layer in range(layers):
            q = kernel(q, k_pages, v_pages, base + layer, tables, seq_lens, query_start)
        return q
    return jax.jit(run)


def bench_decode_step(su: DecodeSetup, ctx, layers):
    """Per-layer time of the decode-only call (as the engine's decode-only programs make
    it: no prefill launch) inside a step of `layers` layers, each layer's pages
    its own (the page table is shared by the layers, as in the engine). Sets of layers
    rotate until L2_DEFEAT_BYTES of K/V are touched."""
    per_layer = su.batch * ctx * kv_token_bytes(su.plan, su.kv_heads)
    n_sets = max(1, min(su.plan.step_max_sets, -(-L2_DEFEAT_BYTES // (layers * per_layer))))
    num_pages = su.batch * (ctx // su.page_size)
    shape = (layers * n_sets, num_pages, su.page_size, su.kv_heads, su.plan.head_dim)
    pools = (filled(shape, DTYPE, 3), filled(shape, DTYPE, 4))
    (q, tables, lens, qs), = decode_sets(su.plan, su.batch, ctx, su.page_size, su.pages_per_seq,
                                         num_pages, 1, jax.random.fold_in(su.key, ctx))
    arg_sets = [(q, *pools, jnp.int32(s * layers), tables, lens, qs) for s in range(n_sets)]
    fn = decode_step(su.step_kernel, layers)
    med, best = time_calls(fn, arg_sets)
    useful = per_layer + 2 * q.size * q.dtype.itemsize
    row = {"layers": layers, "sets": n_sets, "time_us": med / layers * 1e6,
           "best_us": best / layers * 1e6, "tbps": useful * layers / med / 1e12}
    if su.check_step:
        ref = q
        for layer in range(layers):
            ref = su.reference(ref, *pools, jnp.int32(layer), tables, lens, qs)
        err = jnp.abs(fn(*arg_sets[0]).astype(jnp.float32) - ref.astype(jnp.float32))
        row["max_abs_err"] = float(err.max())
    return row


def bench_decode_group(plan, batch, kv_heads, page_size, block_sizes, interpret, ref_at=None):
    """All contexts for one (batch, kv_heads, page_size): one pool, one compile."""
    token_bytes = kv_token_bytes(plan, kv_heads)
    fits = [c for c in plan.contexts if batch * c * token_bytes <= plan.kv_cap_bytes]
    rows = [{"batch": batch, "context": c, "kv_heads": kv_heads, "page_size": page_size,
             "skipped": "over the KV memory cap"} for c in plan.contexts if c not in fits]
    if not fits:
        return rows
    max_ctx = max(fits)
    resolved = block_sizes.resolve(group=plan.q_heads // kv_heads, num_seqs=batch,
                                   kv_heads=kv_heads, max_kv_len=max_ctx)
    su = decode_setup(plan, batch, kv_heads, page_size, max_ctx, resolved, block_sizes,
                      interpret)
    q, tables, _, _ = decode_sets(plan, batch, max_ctx, page_size, su.pages_per_seq,
                                  su.num_pages, 1, su.key)[0]
    check = guarded(lambda: {"max_abs_err": decode_check(
        su.kernel, su.reference, q, su.pools, tables, max_ctx, su.key)})
    base = {"batch": batch, "kv_heads": kv_heads, "q_heads": plan.q_heads,
            "page_size": page_size, "head_dim": plan.head_dim,
            "block_sizes": dataclasses.asdict(resolved), "check": check}
    for ctx in fits:
        if "error" in check:
            rows.append(dict(base, context=ctx))
        else:
            rows.append(dict(base, **bench_decode_ctx(su, ctx, ref_at == ctx)))
    return rows


def timing(fn, arg_sets, nbytes, carry=None):
    med, best = time_calls(fn, arg_sets, carry=carry)
    return {"time_us": med * 1e6, "best_us": best * 1e6, "tbps": nbytes / med / 1e12}


def bench_decode(plan, interpret, block_sizes):
    rows = []
    for kv_heads in plan.kv_heads:
        for page_size in plan.page_sizes:
            for batch in plan.batches:
                if page_size != plan.page_sizes[0] and batch not in plan.page32_batches:
                    continue
                ref_batch, ref_ctx, ref_kvh, ref_page = plan.reference_at
                ref_at = ref_ctx if (batch, kv_heads, page_size) == (
                    ref_batch, ref_kvh, ref_page) else None
                group = bench_decode_group(plan, batch, kv_heads, page_size, block_sizes,
                                           interpret, ref_at)
                rows += group
                times = "; ".join(
                    f"ctx {r['context']} " + " ".join(
                        f"{t.get('time_us', float('nan')):.1f}"
                        for t in (r, r.get("kernel_only", {}), r.get("step", {})) if t)
                    for r in group if "skipped" not in r)
                print(f"decode B={batch} kvh={kv_heads} page={page_size} done (us: full call, "
                      f"kernel-only, step per layer): {times}", flush=True)
    return rows


# ---------------------------------------------------------------- flash prefill


def cudnn_attention(q, k, v, *, batch):
    """jax.nn.dot_product_attention on the packed rows viewed as [B, T, heads, D]."""
    def view(x):
        return x.reshape(batch, -1, *x.shape[1:])
    out = jax.nn.dot_product_attention(view(q), view(k), view(v), is_causal=True,
                                       implementation="cudnn")
    return out.reshape(q.shape)


def prefill_inputs(plan, total, key):
    kq, kk, kv = jax.random.split(key, 3)
    kv_heads = plan.q_heads // 4
    return (jax.random.normal(kq, (total, plan.q_heads, plan.head_dim), DTYPE),
            jax.random.normal(kk, (total, kv_heads, plan.head_dim), DTYPE),
            jax.random.normal(kv, (total, kv_heads, plan.head_dim), DTYPE))


def prefill_reference_check(plan, block_sizes, interpret):
    """Both kernels vs flash_attention_reference on a small ragged packed batch."""
    total = min(2048, plan.prefill_tokens)
    q, k, v = prefill_inputs(plan, total, jax.random.key(7))
    cu = jnp.asarray([0, total // 7, total // 2 + 3, total - 5], jnp.int32)
    ref = fa.flash_attention_reference(q, k, v, cu).astype(jnp.float32)
    ours = fa.flash_attention(q, k, v, cu, block_sizes=block_sizes, interpret=interpret)
    mosaic = fam.flash_attention_mgpu(q, k, v, cu, interpret=interpret)
    return {"max_abs_err": float(jnp.abs(ours.astype(jnp.float32) - ref).max()),
            "mosaic_max_abs_err": float(jnp.abs(mosaic.astype(jnp.float32) - ref).max())}


def ragged_prefill(q, k, v, batch, seq_len, interpret, page_size=16):
    """ragged_paged_attention on the same rows as B fresh prompts of seq_len tokens each
    (no cached prefix), their K/V in pages of 16 in order: (jitted call, its args)."""
    pages = k.shape[0] // page_size
    shape = (1, pages, page_size, *k.shape[1:])
    tables = jnp.arange(pages, dtype=jnp.int32).reshape(batch, seq_len // page_size)
    args = (q, k.reshape(shape), v.reshape(shape), jnp.int32(0), tables,
            jnp.full((batch,), seq_len, jnp.int32),
            jnp.arange(batch + 1, dtype=jnp.int32) * seq_len)
    call = jax.jit(functools.partial(pa.ragged_paged_attention, sm_scale=q.shape[-1] ** -0.5,
                                     interpret=interpret))
    return call, args


def bench_prefill_len(plan, seq_len, block_sizes, interpret):
    batch = max(1, plan.prefill_tokens // seq_len)
    total = batch * seq_len
    q, k, v = prefill_inputs(plan, total, jax.random.key(seq_len))
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * seq_len
    flops = 2 * 2 * batch * plan.q_heads * seq_len * seq_len * plan.head_dim / 2
    ours = jax.jit(functools.partial(fa.flash_attention, block_sizes=block_sizes,
                                     interpret=interpret))
    mosaic = jax.jit(functools.partial(fam.flash_attention_mgpu, interpret=interpret))
    cudnn = jax.jit(functools.partial(cudnn_attention, batch=batch))
    ragged, paged = ragged_prefill(q, k, v, batch, seq_len, interpret)
    row = {"seq_len": seq_len, "batch": batch, "q_heads": plan.q_heads,
           "kv_heads": plan.q_heads // 4, "head_dim": plan.head_dim, "flops": flops,
           "block_sizes": dataclasses.asdict(block_sizes)}

    def tflops(fn, args):
        med, best = time_calls(fn, [args])
        return {"time_us": med * 1e6, "tflops": flops / med / 1e12,
                "best_tflops": flops / best / 1e12}

    row["pallas"] = guarded(lambda: tflops(ours, (q, k, v, cu)))
    row["mosaic"] = guarded(lambda: tflops(mosaic, (q, k, v, cu)))
    row["ragged"] = guarded(lambda: tflops(ragged, paged))
    row["cudnn"] = guarded(lambda: tflops(cudnn, (q, k, v)))
    expected = functools.cache(lambda: cudnn(q, k, v).astype(jnp.float32))  # once, if at all
    for name, fn, args in (("", ours, (q, k, v, cu)), ("mosaic_", mosaic, (q, k, v, cu)),
                           ("ragged_", ragged, paged)):
        row[f"{name}max_abs_err_vs_cudnn"] = guarded(lambda fn=fn, args=args: float(jnp.abs(
            fn(*args).astype(jnp.float32) - expected()).max()))
        kernel = row[name[:-1] if name else "pallas"]
        if "tflops" in kernel and "tflops" in row["cudnn"]:
            row[f"{name}ratio_vs_cudnn"] = kernel["tflops"] / row["cudnn"]["tflops"]
    return row


def bench_prefill(plan, interpret, block_sizes):
    rows = []
    for seq_len in plan.prefill_lens:
        rows.append(bench_prefill_len(plan, seq_len, block_sizes, interpret))
        print(f"prefill T={seq_len} done", flush=True)
    return rows


# ---------------------------------------------------------------- autotune

DECODE_CANDIDATES = (
    pa.BlockSizes(),
    pa.BlockSizes(block_kv_decode=128, num_stages_decode=2),
    pa.BlockSizes(block_kv_decode=32, num_stages_decode=4),
    pa.BlockSizes(num_warps_decode=8, num_stages_decode=4),
)
FLASH_CANDIDATES = (
    fa.BlockSizes(),
    fa.BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=2),
    fa.BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3),
    fa.BlockSizes(block_q=64, block_k=128, num_warps=4, num_stages=2),
)


def autotune(plan, interpret, prefill=True):
    """Best of a few block-size candidates per shape class (decode: small/large batch), and
    for flash prefill unless `prefill` is False."""
    result = {"decode": [], "prefill": []}
    for batch, ctx, kv_heads in plan.autotune_decode:
        sub = dataclasses.replace(plan, contexts=(ctx,))
        runs = []
        for cand in DECODE_CANDIDATES:
            rows = bench_decode_group(sub, batch, kv_heads, plan.page_sizes[0], cand, interpret)
            runs.append({"block_sizes": dataclasses.asdict(cand), "result": rows[-1]})
        result["decode"].append({"batch": batch, "context": ctx, "kv_heads": kv_heads,
                                 "runs": runs, "best": _best(runs, "tbps")})
    if not prefill:
        return result
    seq_len = plan.prefill_lens[len(plan.prefill_lens) // 2]
    runs = []
    for cand in FLASH_CANDIDATES:
        row = bench_prefill_len(plan, seq_len, cand, interpret)
        runs.append({"block_sizes": dataclasses.asdict(cand),
                     "result": dict(row["pallas"], max_abs_err=row["max_abs_err_vs_cudnn"])})
    result["prefill"].append({"seq_len": seq_len, "runs": runs, "best": _best(runs, "tflops")})
    return result


def _best(runs, metric):
    ok = [r for r in runs if metric in r["result"]]
    return max(ok, key=lambda r: r["result"][metric])["block_sizes"] if ok else None


# ---------------------------------------------------------------- report


def output_path(arg: str | None, device_kind: str, stamp: str) -> pathlib.Path:
    if arg:
        return pathlib.Path(arg)
    if os.environ.get("OUT"):
        return pathlib.Path(os.environ["OUT"]) / "bench_kernels.json"
    name = "".join(c if c.isalnum() else "_" for c in device_kind).strip("_")
    return pathlib.Path(__file__).resolve().parents[1] / "bench" / "results" / \
        f"bench_kernels_{name}_{stamp}.json"


def print_table(results):
    copy = results["copy"]["tbps"]
    print(f"\n{results['device_kind']}  jax {results['jax_version']}  "
          f"copy {copy:.2f} TB/s (read+write), dispatch floor "
          f"{results['copy']['dispatch_floor_us']:.1f} us/call")
    print("\npaged decode (bf16, q heads "
          f"{results['plan']['q_heads']}, head_dim {results['plan']['head_dim']})")
    print(f"{'B':>5} {'ctx':>6} {'kvh':>4} {'page':>5} {'us':>9} {'TB/s':>6} {'%copy':>6} "
          f"{'kernel-only':>12} {'step, per layer':>22}  check")
    for r in results["decode"]:
        if "skipped" in r:
            continue
        check = r["check"].get("max_abs_err", r["check"].get("error", ""))
        timing = (f"{r['time_us']:9.1f} {r['tbps']:6.2f} {100 * r['tbps'] / copy:5.0f}%"
                  if "tbps" in r else f"{'error':>23}")
        only = r.get("kernel_only", {})
        timing += (f" {only['tbps']:5.2f} {100 * only['tbps'] / copy:4.0f}%" if "tbps" in only
                   else f" {'-':>11}")
        step = r.get("step", {})
        timing += (f" {step['time_us']:7.1f} {step['tbps']:5.2f} {100 * step['tbps'] / copy:4.0f}%"
                   f" x{step['layers']:<2d}" if "tbps" in step else f" {'-':>22}")
        ref = r.get("reference", {})
        extra = f"  reference {ref['tbps']:.2f} TB/s" if "tbps" in ref else ""
        print(f"{r['batch']:5d} {r['context']:6d} {r['kv_heads']:4d} {r['page_size']:5d} "
              f"{timing}  {check}{extra}")
    for line in target_summary(results["decode"], copy):
        print(line)
    if "prefill" in results:
        print_prefill_table(results["prefill"])
    if "autotune" in results:
        for a in results["autotune"]["decode"]:
            print(f"autotune decode B={a['batch']} ctx={a['context']}: best {a['best']}")
        for a in results["autotune"]["prefill"]:
            print(f"autotune prefill T={a['seq_len']}: best {a['best']}")


def target_summary(rows, copy):
    """Lines counting the rows of issue 12's paged-decode target (B >= 32, context >= 2k) at
    85% of copy bandwidth or more, by timing."""
    rows = [r for r in rows if "skipped" not in r and r["batch"] >= TARGET_MIN_BATCH
            and r["context"] >= TARGET_MIN_CONTEXT]
    if not rows:
        return []
    lines = [f"\nrows with B >= {TARGET_MIN_BATCH} and context >= {TARGET_MIN_CONTEXT}: "
             f"{len(rows)}; at {100 * TARGET_SHARE:.0f}% of copy bandwidth or more:"]
    for name, get in (("full call", lambda r: r), ("kernel-only", lambda r: r.get("kernel_only")),
                      ("step, per layer", lambda r: r.get("step"))):
        timed = [r for r in rows if "tbps" in (get(r) or {})]
        met = [r for r in timed if get(r)["tbps"] >= TARGET_SHARE * copy]
        missed = ", ".join(f"B={r['batch']} ctx={r['context']} kvh={r['kv_heads']} "
                           f"page={r['page_size']} ({100 * get(r)['tbps'] / copy:.0f}%)"
                           for r in timed if r not in met)
        lines.append(f"  {name}: {len(met)} of {len(timed)} timed"
                     + (f"; missed: {missed}" if missed else ""))
    return lines


def print_prefill_table(rows):
    print("\nflash prefill (causal, bf16) vs cuDNN")
    print(f"{'T':>6} {'B':>4} {'triton TF/s':>12} {'ratio':>6} {'mosaic TF/s':>12} "
          f"{'ratio':>6} {'ragged TF/s':>12} {'ratio':>6} {'cudnn TF/s':>11}  "
          "err (triton, mosaic, ragged)")
    for r in rows:
        fmt = lambda x: f"{x:.0f}" if x is not None else "error"  # noqa: E731
        ratio = lambda k, r=r: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        print(f"{r['seq_len']:6d} {r['batch']:4d} {fmt(r['pallas'].get('tflops')):>12} "
              f"{ratio('ratio_vs_cudnn'):>6} {fmt(r['mosaic'].get('tflops')):>12} "
              f"{ratio('mosaic_ratio_vs_cudnn'):>6} {fmt(r['ragged'].get('tflops')):>12} "
              f"{ratio('ragged_ratio_vs_cudnn'):>6} {fmt(r['cudnn'].get('tflops')):>11}  "
              f"{r['max_abs_err_vs_cudnn']}, {r['mosaic_max_abs_err_vs_cudnn']}, "
              f"{r['ragged_max_abs_err_vs_cudnn']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few shapes only")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny shapes; interpret mode when there is no GPU (plumbing check)")
    parser.add_argument("--autotune", action="store_true",
                        help="also sweep 4 block-size candidates per shape class")
    parser.add_argument("--decode-only", action="store_true",
                        help="paged decode only, no flash prefill (nor its autotuning)")
    parser.add_argument("--out", help="JSON path (default: $OUT/bench_kernels.json or "
                                      "bench/results/)")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    interpret = jax.default_backend() != "gpu"
    if interpret and not args.smoke:
        parser.error("no GPU: run with --smoke for an interpret-mode plumbing check")
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.UTC)
    results = {"device_kind": device.device_kind, "platform": device.platform,
               "date": now.isoformat(timespec="seconds"), "jax_version": jax.__version__,
               "interpret": interpret, "plan": dataclasses.asdict(plan)}
    t0 = time.perf_counter()
    results["copy"] = bench_copy(plan)
    print(f"copy {results['copy']['tbps']:.2f} TB/s", flush=True)
    results["decode"] = bench_decode(plan, interpret, pa.BlockSizes())
    if not args.decode_only:
        results["prefill_reference_check"] = guarded(
            lambda: prefill_reference_check(plan, fa.BlockSizes(), interpret))
        results["prefill"] = bench_prefill(plan, interpret, fa.BlockSizes())
    if args.autotune:
        results["autotune"] = autotune(plan, interpret, prefill=not args.decode_only)
    results["wall_s"] = time.perf_counter() - t0
    path = output_path(args.out, device.device_kind, now.strftime("%Y%m%dT%H%M%SZ"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    print(f"\nwrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
