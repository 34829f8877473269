"""Engine set-ups shared by the step benchmarks (bench_host.py, trace_step.py,
profile_step.py, bench_verify_cost.py)."""

from __future__ import annotations

import hashlib
import time

import jax
import numpy as np

from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.request import SamplingParams


def bucket_overrides(token_buckets: list[int] | None, seq_buckets: list[int] | None) -> dict:
    """Config.replace() keys for the step buckets given on a command line (None: keep the
    config's); the prefill chunk follows the largest token bucket."""
    over = {}
    if token_buckets:
        over["runner__token_buckets"] = tuple(token_buckets)
        over["scheduler__max_num_batched_tokens"] = max(token_buckets)
    if seq_buckets:
        over["runner__seq_buckets"] = tuple(seq_buckets)
    return over


def prefilling(engine: Engine) -> bool:
    """Whether a request still waits or has prompt tokens left to compute."""
    return bool(engine.scheduler.num_waiting) or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)


def decode_together(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                    prefix: str) -> None:
    """Add the prompts, step until every one is past its prefill, then 3 more steps (first
    executions stay out of what follows); the engine's step timers start from zero."""
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"{prefix}{i}")
    while prefilling(engine):
        engine.step()
    for _ in range(3):
        engine.step()
    engine.step_times = StepTimes()


def step_weight_bytes(engine: Engine) -> int:
    """Bytes of weights a decode step reads on the first device: every parameter, the
    embedding table only when it is the LM head too (otherwise a step reads one row of it
    per token)."""
    device = jax.devices()[0]
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(engine.runner.params):
        if "embedding" in jax.tree_util.keystr(path) and \
                not engine.model_config.tie_word_embeddings:
            continue
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


def tokens_digest(requests) -> str:
    """A short hash of the requests' output tokens, in request-id order: runs of one config
    under other XLA flags must give the same digest (a flag that changes the output is a
    bug, not a speed-up)."""
    return digest([t for r in sorted(requests, key=lambda r: r.request_id)
                   for t in r.output_ids])


def digest(token_ids) -> str:
    """A short hash of a sequence of token ids."""
    return hashlib.sha256(np.asarray(token_ids, np.int64).tobytes()).hexdigest()[:16]


def abort_all(engine: Engine) -> None:
    """Abort every running request and step until the engine is idle."""
    for r in list(engine.scheduler.running):
        engine.abort(r.request_id)
    while engine.has_unfinished():
        engine.step()


def replay_ms(runner, bucket, host_in, prev_tokens, steps: int) -> float:
    """ms per step of the compiled step replayed alone on prepared inputs (Runner.prepare):
    3 warm calls, then `steps` back to back, so the host dispatches ahead of the device."""
    for _ in range(3):
        runner.state, out, prev_tokens = runner.run_prepared(bucket, host_in, prev_tokens)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(steps):
        runner.state, out, prev_tokens = runner.run_prepared(bucket, host_in, prev_tokens)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps * 1000
