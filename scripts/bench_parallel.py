"""Decode on a mesh: step time and output tok/s per (mesh, batch), against the step floor.

    python scripts/bench_parallel.py --config configs/llama3-8b-random-gpu.yaml \
        --mesh tensor=1 --mesh tensor=2 --mesh data=2 --batch 1 32 128 --out result.json

For each mesh (in this one process, one after the other) the engine is built on random
weights, warmed up, and for each batch B it serves B requests per data shard, each with
--input-len random prompt tokens and exactly --output-len output tokens (greedy, ignore_eos).
Figures:
  decode_step_ms     wall time of an engine step while all B x D requests decode together
                     (the engine dispatches step N+1 before reading step N back, so this is
                     the device step when the device is the bottleneck), median of
                     --output-len steps (see run_batch for how they all reach decode at once);
  decode_tok_s       output tokens per second over those steps (all replicas);
  floor_ms           (weight bytes + KV bytes read per step) of one device over the copy
                     bandwidth measured at the start of the run (the weights without an
                     untied embedding table, of which a step reads one row per token, as
                     engine_runs.step_weight_bytes counts them); for an MoE model only
                     the experts a step routes to are read: B decode tokens each routed
                     to k of n experts touch an expected 1 - (1 - k/n)^B of them (uniform
                     routing, which random routers give), and that share of the device's
                     expert bytes counts;
  step_phases_ms     the engine's own timers (engine.StepTimes): host work per step by phase,
                     and wait, the time blocked on the device;
  broadcast_ms       over several processes, the leader's wall time per decode step spent
                     sending the step's inputs to the other processes (multihost.py), and
                     its share of the step;
XLA_FLAGS and the NCCL variables in the environment are recorded with the figures.
--decode-steps K runs each engine step as a call of K decode steps (multi-step decode);
decode_step_ms is then the median call over K, the time per token step, and broadcast_ms
the leader's sending time over the token steps the window returned.
--quantization and --kv-dtype run every mesh with int8/fp8 weights or KV pages
(docs/quantization.md); the floor counts the bytes the quantized model reads.

Several processes (one GPU each, the code path of several hosts): start one per GPU with
--coordinator-address/--num-processes/--process-id, as `jaxserve serve` takes them. Process 0
runs the engine and writes the JSON; the others follow its steps, mesh after mesh:

    for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python scripts/bench_parallel.py \
        --config configs/llama3-8b-random-gpu.yaml --mesh pipeline=2 --mesh tensor=2 \
        --coordinator-address 127.0.0.1:8476 --num-processes 2 --process-id $i \
        --out result.json & done; wait
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from engine_runs import prefilling, step_weight_bytes, tokens_digest
from timing import copy_bandwidth, median_seconds

from jaxserve.config import load_config
from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.kv_memory import kv_bytes_per_head_token
from jaxserve.engine.request import SamplingParams
from jaxserve.launch import add_distributed_args, join, with_distributed_args
from jaxserve.loader import load_model, random_model_config
from jaxserve.models.llama import flatten_params
from sharding.mesh import MeshConfig

ADMISSION_STEPS = 200  # at most this many steps to re-admit every request (budget >= 128)


def all_reduce_latency(hidden: int, rows: int, chain: int = 64) -> float | None:
    """Seconds per all-reduce of a [rows, hidden] bf16 activation over two devices, timed as a
    chain of `chain` dependent all-reduces (as a decode step runs them); None on one device."""
    if jax.device_count() < 2:
        return None
    mesh = jax.make_mesh((2,), ("tensor",), axis_types=(jax.sharding.AxisType.Explicit,))

    def body(x):
        for _ in range(chain):
            x = jax.lax.psum(x, "tensor") * 0.5
        return x

    spec = jax.sharding.PartitionSpec("tensor")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
    host = np.asarray(jax.random.normal(jax.random.key(1), (2 * rows, hidden), jnp.float32))
    x = jax.make_array_from_callback(host.shape, jax.sharding.NamedSharding(mesh, spec),
                                     lambda i: host[i].astype(jnp.bfloat16))
    return median_seconds(f, x, reps=20) / chain


def parse_mesh(text: str) -> MeshConfig:
    return MeshConfig(**{k: int(v) for k, v in (kv.split("=") for kv in text.split(","))})


def on_mesh(base, mesh_text: str):
    """The config on one --mesh. Pipeline stages split the stacked layer axis, so a config
    with runner.layer_arrays runs such a mesh with its layers stacked."""
    mesh = parse_mesh(mesh_text)
    config = base.replace(mesh=mesh)
    if mesh.pipeline > 1 and config.runner.layer_arrays:
        config = config.replace(runner__layer_arrays=False)
    return config


def device0_bytes(arrays) -> int:
    """Bytes that the first device (the leader's) holds of these arrays."""
    d0 = jax.devices()[0]
    return sum(s.data.nbytes for a in jax.tree.leaves(arrays) for s in a.addressable_shards
               if s.device == d0)


def drain(engine: Engine) -> int:
    """Step until every request is done; returns the output tokens produced."""
    n = 0
    while engine.has_unfinished():
        n += sum(len(o.token_ids) for o in engine.step())
    return n


def run_batch(engine: Engine, batch: int, input_len: int, output_len: int,
              rng: np.random.Generator) -> dict:
    """B requests per data shard decoding together, at a context of about input_len.

    The prompts are prefilled once first (one output token each), so their full pages sit
    in the prefix cache; sent again, each request computes only its last partial page, and
    within a few steps all of them decode at once. Then `output_len` steps are timed.
    """
    vocab = engine.model_config.vocab_size
    total = batch * engine.runner.num_shards
    prompts = [rng.integers(3, vocab, input_len).tolist() for _ in range(total)]
    t = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0), f"p{i}")
    drain(engine)
    prefill_s = time.perf_counter() - t

    k = engine.config.scheduler.decode_steps  # token steps per call once all decode
    params = SamplingParams(max_tokens=(output_len + ADMISSION_STEPS) * k, temperature=0.0,
                            ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"d{i}")
    steps = 0
    while prefilling(engine):
        engine.step()
        steps += 1
        if steps > ADMISSION_STEPS:
            raise RuntimeError(f"{total} requests not all decoding after {steps} steps")
    running = engine.scheduler.running
    assert len(running) == total, (len(running), total)
    context = [sum(r.num_tokens for r in running) / total]
    times, tokens = [], 0
    sent_before = sent_seconds(engine)
    engine.step_times = StepTimes()
    for _ in range(output_len):
        t = time.perf_counter()
        tokens += sum(len(o.token_ids) for o in engine.step())
        times.append(time.perf_counter() - t)
    assert len(engine.scheduler.running) == total  # nobody finished inside the window
    context.append(sum(r.num_tokens for r in running) / total)
    sent = sent_seconds(engine) - sent_before
    digest = tokens_digest(running)
    for r in list(running):
        engine.abort(r.request_id)
    drain(engine)
    token_steps = tokens / total  # a call returns the tokens of the call before it
    return {"batch_per_replica": batch, "requests": total, "input_len": input_len,
            "decode_steps": token_steps, "steps_per_call": k,
            "mean_context": float(np.mean(context)),
            "decode_step_ms": float(np.median(times) / k * 1e3),
            "decode_step_p90_ms": float(np.percentile(times, 90) / k * 1e3),
            "decode_tok_s": tokens / sum(times),
            "prefill_tok_s_at_bucket": total * input_len / prefill_s,
            "broadcast_ms": sent / token_steps * 1e3,
            "step_phases_ms": engine.step_times.per_step_ms(),
            "broadcast_share": sent / sum(times),
            "preemptions": engine.scheduler.num_preemptions, "tokens_digest": digest}


def memory_in_use() -> list[float]:
    """GiB in use on each of this process's devices."""
    return [round((d.memory_stats() or {}).get("bytes_in_use", 0) / 2**30, 2)
            for d in jax.local_devices()]


def kv_bytes_per_token(engine: Engine) -> int:
    """KV bytes one token's cache takes on one device (K and V, every layer of its stage)."""
    c, runner = engine.model_config, engine.runner
    return (2 * runner.pipeline.slots * runner.plan.kv_heads
            * kv_bytes_per_head_token(runner.config, c.head_dim))


class TimedSend:
    """The leader's step channel, counting the wall time its sends take."""

    def __init__(self, channel):
        self._send, self.seconds = channel.send, 0.0
        channel.send = self

    def __call__(self, message) -> None:
        t = time.perf_counter()
        self._send(message)
        self.seconds += time.perf_counter() - t


def sent_seconds(engine: Engine) -> float:
    """Seconds the leader has spent sending steps to the other processes (0 in one process)."""
    channel = engine.runner.channel
    return channel.send.seconds if channel is not None else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--shape", help="model_config.json with the shapes (default: the config's)")
    ap.add_argument("--mesh", action="append", required=True, help="e.g. tensor=2 or data=2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--token-buckets", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--seq-buckets", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--kv-cache-memory", type=float, default=0.85)
    ap.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth test")
    ap.add_argument("--quantization", choices=["none", "int8", "fp8"],
                    help="model.quantization for every mesh (default: the config's)")
    ap.add_argument("--kv-dtype", choices=["auto", "int8", "fp8"],
                    help="cache.kv_dtype for every mesh (default: the config's)")
    ap.add_argument("--kv-rotation", action="store_true",
                    help="cache.kv_rotation on for every mesh (needs --kv-dtype int8 or fp8)")
    ap.add_argument("--decode-steps", type=int,
                    help="scheduler.decode_steps for every mesh (default: the config's)")
    ap.add_argument("--out", required=True)
    add_distributed_args(ap)
    args = ap.parse_args()

    base = load_config(args.config)
    if args.decode_steps:
        base = base.replace(scheduler__decode_steps=args.decode_steps)
    k = base.scheduler.decode_steps  # a request's tokens grow by up to k per step
    base = base.replace(
        runner__token_buckets=tuple(args.token_buckets),
        runner__seq_buckets=tuple(args.seq_buckets),
        scheduler__max_num_batched_tokens=args.token_buckets[-1],
        scheduler__max_num_seqs=args.seq_buckets[-1],
        cache__kv_cache_memory=args.kv_cache_memory,
        cache__max_model_len=args.input_len + (args.output_len + ADMISSION_STEPS) * k + 16,
        runner__compilation_cache_dir=None)
    if args.shape:
        base = base.replace(checkpoint__random_shape=args.shape)
    if args.quantization:
        base = base.replace(model__quantization=args.quantization)
    if args.kv_dtype:
        base = base.replace(cache__kv_dtype=args.kv_dtype)
    if args.kv_rotation:
        base = base.replace(cache__kv_rotation=True)
    base = with_distributed_args(base, args, "bench_parallel")
    leader = join(base)  # every process runs what follows up to the meshes, in step
    bandwidth = copy_bandwidth(args.copy_gib)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    hidden = random_model_config(base).hidden_size
    all_reduce = {rows: all_reduce_latency(hidden, rows) for rows in (32, 128)}
    print(f"all-reduce of [rows, {hidden}] bf16 over 2 devices, us: "
          f"{ {k: v and round(v * 1e6, 1) for k, v in all_reduce.items()} }", flush=True)
    if not leader:
        for mesh_text in args.mesh:
            loaded = load_model(on_mesh(base, mesh_text), progress=False)
            Engine(base, loaded.model_config, loaded.params, None, loaded.mesh).runner.follow()
            del loaded
            gc.collect()
            jax.clear_caches()
        return
    rng = np.random.default_rng(0)
    runs: list[dict] = []
    for mesh_text in args.mesh:
        def keep(row: dict) -> None:  # every row is on disk as soon as it is measured
            runs.append(row)
            write(args, bandwidth, all_reduce, runs)

        try:
            bench_mesh(on_mesh(base, mesh_text), mesh_text, args, bandwidth,
                       rng, keep)
        except Exception:  # noqa: BLE001 -- report it and go on with the next mesh
            if jax.process_count() > 1:
                raise  # the followers wait in a collective: end them all
            traceback.print_exc()
            keep({"mesh": mesh_text, "error": traceback.format_exc(limit=3)})
        gc.collect()  # the engine's jitted step refers back to it: free its KV cache now
        jax.clear_caches()
    print(f"{'mesh':>10} {'B':>4} {'step ms':>8} {'floor ms':>8} {'share':>6} {'tok/s':>9}")
    for r in runs:
        if "error" in r:
            print(f"{r['mesh']:>10} failed: {r['error'].splitlines()[-1]}")
            continue
        print(f"{r['mesh']:>10} {r['batch_per_replica']:>4} {r['decode_step_ms']:8.2f} "
              f"{r['floor_ms']:8.2f} {r['floor_share']:6.0%} {r['decode_tok_s']:9.0f}")


def bench_mesh(config, mesh_text: str, args, bandwidth: float, rng, keep) -> None:
    t = time.perf_counter()
    loaded = load_model(config, progress=False)
    engine = Engine(config, loaded.model_config, loaded.params, None, loaded.mesh)
    if engine.runner.channel is not None:
        TimedSend(engine.runner.channel)
    load_s = time.perf_counter() - t
    print(f"{mesh_text}: loaded in {load_s:.0f} s, {engine.runner.num_pages} KV pages per "
          f"replica, GiB in use {memory_in_use()}", flush=True)
    t = time.perf_counter()
    engine.warm_up(progress=False)
    compile_s = time.perf_counter() - t
    temp = {f"{tk}x{sq}": engine.runner.compiled_temp_bytes(tk, sq)
            for tk, sq in engine.runner.bucket_pairs()}
    print(f"{mesh_text}: compiled in {compile_s:.0f} s, step scratch bytes {temp}", flush=True)
    compiled = engine.runner.num_compilations
    run_batch(engine, 1, 32, 4, rng)  # first executions stay out of the figures
    weights = step_weight_bytes(engine)  # an untied embedding table: one row per token
    c = loaded.model_config
    experts = device0_bytes([v for k, v in flatten_params(loaded.params).items()
                             if "moe/" in k and k.endswith("_proj")])
    for b in args.batch:
        row = run_batch(engine, b, args.input_len, args.output_len, rng)
        # a pipeline tick runs one micro-batch (B / stages sequences) through each stage
        kv = b / engine.runner.stages * row["mean_context"] * kv_bytes_per_token(engine)
        touched = 1 - (1 - c.num_experts_per_tok / c.num_experts) ** b if c.is_moe else 1.0
        read = weights - experts * (1 - touched)
        row.update(mesh=mesh_text, weight_bytes_per_device=weights, kv_bytes_per_device=kv,
                   expert_bytes_per_device=experts, expected_expert_share_read=touched,
                   weight_bytes_read_per_device=read,
                   floor_ms=(read + kv) / bandwidth * 1e3, load_s=load_s,
                   compile_s=compile_s, step_scratch_bytes=temp,
                   kv_pages_per_replica=engine.runner.num_pages)
        row["floor_share"] = row["floor_ms"] / row["decode_step_ms"]
        row["recompilations"] = engine.runner.num_compilations - compiled
        keep(row)
        print(json.dumps({k: row[k] for k in ("mesh", "batch_per_replica", "decode_step_ms",
                                              "decode_tok_s", "mean_context", "floor_ms",
                                              "floor_share", "broadcast_ms")}), flush=True)
    engine.runner.close()  # the followers go on to the next mesh


def write(args, bandwidth: float, all_reduce: dict, runs: list[dict]) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_FLAGS", "NCCL_"))}
    result = {"benchmark": "parallel-decode",
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
              "num_processes": jax.process_count(),
              "jax": jax.__version__, "config": args.config, "shape": args.shape,
              "quantization": args.quantization or "config's",
              "kv_dtype": args.kv_dtype or "config's",
              "copy_bandwidth_bytes_s": bandwidth, "all_reduce_s_by_rows": all_reduce,
              "env": env, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
