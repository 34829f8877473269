"""Timing helpers shared by the benchmark scripts: the median wall time of a device call,
the device's memory bandwidth (the roofline of a decode step), and the garbage
collector's pauses."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.heap import PauseWatch
from jaxserve.engine.kv_memory import free_device_bytes


def median_seconds(fn, *args, reps: int) -> float:
    """Median wall time of fn(*args) to completion, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy on the first device (read + write)."""
    n = int(gib * 2**30) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    return 2 * n * 2 / median_seconds(jax.jit(lambda a: a * 1), x, reps=10)


def probe_gib(gib: float, device=None) -> float:
    """`gib`, or a quarter of the device's free memory where that is less: a bandwidth
    probe run beside a warm engine (whose KV pages took a fraction of the free memory) must
    fit, with the sum's own buffers, in what is left. Devices that report no memory size
    get `gib`."""
    free = free_device_bytes([device or jax.devices()[0]])
    return gib if free is None else min(gib, free / 4 / 2**30)


def read_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second read by a sum over the first device's memory."""
    n = int(gib * 2**30) // 4
    x = jnp.ones((n,), jnp.float32)
    return n * 4 / median_seconds(jax.jit(jnp.sum), x, reps=10)


class GcPauses(PauseWatch):
    """The cyclic garbage collector's runs while the context is open: how many of each
    generation, their summed and longest pause (`summary()`)."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        super().__init__(lambda generation, seconds: self.pauses.append((generation, seconds)))

    def summary(self) -> dict:
        out = {}
        for gen in (0, 1, 2):
            ms = [p * 1e3 for g, p in self.pauses if g == gen]
            out[f"gen{gen}"] = {"collections": len(ms), "total_ms": round(sum(ms), 3),
                                "max_ms": round(max(ms, default=0.0), 3)}
        return out
