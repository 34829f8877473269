"""Engine set-ups shared by the step benchmarks (bench_host.py, trace_step.py)."""

from __future__ import annotations

from jaxserve.engine.engine import Engine, StepTimes
from jaxserve.engine.request import SamplingParams


def decode_together(engine: Engine, prompts: list[list[int]], params: SamplingParams,
                    prefix: str) -> None:
    """Add the prompts, step until every one is past its prefill, then 3 more steps (first
    executions stay out of what follows); the engine's step timers start from zero."""
    for i, ids in enumerate(prompts):
        engine.add_request(ids, params, f"{prefix}{i}")
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    engine.step_times = StepTimes()


def abort_all(engine: Engine) -> None:
    """Abort every running request and step until the engine is idle."""
    for r in list(engine.scheduler.running):
        engine.abort(r.request_id)
    while engine.has_unfinished():
        engine.step()
