"""How many KV pages a device holds: the budget (cache.kv_cache_memory, bytes or a fraction
of free memory), the bytes of one page, and the room the step programs' XLA scratch needs.

The pages are one array per K and V, allocated once, before serving. What else a step needs
on the device comes after them: its XLA scratch (a prompt step of 16384 tokens of the 8B
shape needs about twice an 8192-token step's), the penalty tables, the inputs and outputs.
So where devices report their memory, the runner compiles its largest step program before
it allocates the pages and reads that program's scratch: a fraction of free memory gives
the pages no more than what leaves room for it (`pages_beside_scratch`), and a byte count
that does not fit beside it is a ConfigError before any other program compiles
(`check_bytes_beside_scratch`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxserve.config import Config
from jaxserve.errors import ConfigError
from jaxserve.models.model_config import ModelConfig
from jaxserve.models.quant import kv_pages_dtype

DEFAULT_KV_FRACTION = 0.9
DEFAULT_KV_BYTES = 1 << 30  # per device, where devices report no memory size (CPU)


def free_device_bytes(devices) -> int | None:
    """Free memory of the device that has least (its allocator's limit less what is in use),
    or None where a device reports no memory size (a CPU; XLA's VMM allocator)."""
    stats = [d.memory_stats() or {} for d in devices]
    if not all("bytes_limit" in st for st in stats):
        return None
    return min(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)


def kv_budget(config: Config, devices) -> float:
    """cache.kv_cache_memory, or its default for these devices: a fraction (<= 1) of free
    memory, or bytes. ConfigError for a fraction on devices that report no memory size, and
    for no size at all on accelerators that report none (no silent 1 GiB on a GPU)."""
    budget = config.cache.kv_cache_memory
    reported = free_device_bytes(devices) is not None
    kind = "/".join(sorted({d.platform for d in devices}))
    if budget is None:
        if reported:
            return DEFAULT_KV_FRACTION
        if kind != "cpu":
            raise ConfigError(
                f"cache.kv_cache_memory is unset, and these {kind} devices report no memory "
                "size to take a fraction of (XLA's VMM allocator, which a "
                "--xla_gpu_command_buffer_update_mode other than the default switches on, "
                "reports none); give a byte count (e.g. 68719476736)")
        return DEFAULT_KV_BYTES
    if budget <= 1 and not reported:
        unset = " or leave it unset" if kind == "cpu" else ""
        raise ConfigError(f"cache.kv_cache_memory={budget:g} is a fraction of free device "
                          f"memory, but {kind} devices report no memory size; give a byte "
                          f"count (e.g. 268435456){unset}")
    return budget


def kv_dtype(config: Config) -> jnp.dtype:
    """The KV pages' dtype: the model's, or int8/fp8 storage (cache.kv_dtype)."""
    return jnp.dtype(kv_pages_dtype(config.cache.kv_dtype, config.model.dtype))


def kv_bytes_per_head_token(config: Config, head_dim: int) -> int:
    """Bytes of K or V for one token of one KV head of one layer: the vector, plus its
    float32 scale in a quantized cache."""
    return head_dim * kv_dtype(config).itemsize + (4 if config.cache.kv_dtype != "auto" else 0)


def kv_page_bytes(config: Config, model: ModelConfig, kv_heads_per_device: int,
                  layers_per_device: int) -> int:
    """Bytes of one KV page (K and V, every layer) on one device."""
    return 2 * layers_per_device * config.cache.page_size * kv_heads_per_device \
        * kv_bytes_per_head_token(config, model.head_dim)


def num_kv_pages(config: Config, model: ModelConfig, mesh, kv_heads_per_device: int,
                 layers_per_device: int) -> int:
    """Pages per data shard that fit the KV budget of every device: bytes per device, or a
    fraction of the free memory of the device that has least (weights already loaded). A
    byte count larger than that free memory (on a CPU: than the host's memory, which its
    devices share) is a ConfigError."""
    page_bytes = kv_page_bytes(config, model, kv_heads_per_device, layers_per_device)
    devices = mesh.local_devices
    budget = kv_budget(config, devices)
    free, there = free_device_bytes(devices), ""
    if free is not None:
        there = (f"the device with least free memory has {free} bytes free after the "
                 "weights; give a smaller byte count or a fraction of free memory")
    elif all(d.platform == "cpu" for d in devices):  # CPU devices share the host's memory
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
        there = (f"this host has {free * len(devices)} bytes of memory"
                 + (f" for {len(devices)} devices" if len(devices) > 1 else "")
                 + "; give a smaller byte count")
    if budget <= 1:
        budget = budget * free
    elif free is not None and budget > free:
        given = "" if config.cache.kv_cache_memory is not None else " (unset: the default)"
        raise ConfigError(f"cache.kv_cache_memory={budget:.0f} bytes per device{given}, but "
                          f"{there}")
    pages = int(budget // page_bytes)
    if jax.process_count() > 1:  # every process must build the same cache
        pages = int(np.min(multihost_utils.process_allgather(np.int64(pages))))
    return pages


def check_pages(config: Config, num_pages: int, page_bytes: int, beside: str = "") -> None:
    """ConfigError unless num_pages (one of them the reserved null page) hold a sequence of
    cache.max_model_len; `beside` says what else took the memory, where something did."""
    page_size = config.cache.page_size
    if (num_pages - 1) * page_size >= config.cache.max_model_len:
        return
    need = -(-config.cache.max_model_len // page_size) + 1
    usable = f"{(num_pages - 1) * page_size} tokens" if num_pages > 0 else "no token"
    raise ConfigError(
        f"cache.kv_cache_memory holds {num_pages} pages of {page_size} tokens{beside}, one "
        f"of them reserved: {usable}, fewer than one sequence of cache.max_model_len="
        f"{config.cache.max_model_len}; one needs {need} pages, {need * page_bytes} bytes per "
        "device")


# Room the KV pages leave on a device beside the largest step program's XLA scratch and the
# step's other state: the allocator's slack, and a step's inputs and outputs.
SLACK_FRACTION = 0.02
SLACK_MIN_BYTES = 256 << 20


def slack_bytes(free: int) -> int:
    return max(SLACK_MIN_BYTES, int(SLACK_FRACTION * free))


def per_device_bytes(arrays) -> int:
    """Bytes one device holds of these arrays (or shapes with a sharding)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(arrays))


def pages_beside_scratch(pages: int, page_bytes: int, free: int, scratch: int,
                         others: int) -> int:
    """The pages of a fraction budget, cut to those that leave room, of the `free` bytes
    before any of them, for the largest step program's XLA `scratch`, the step's `others`
    (penalty tables, pipeline buffers) and slack_bytes."""
    room = free - scratch - others - slack_bytes(free)
    return min(pages, max(0, room // page_bytes))


def scratch_words(scratch: int, program: tuple[int, ...]) -> str:
    return (f"the XLA scratch of the step program of {program[0]} tokens and {program[1]} "
            f"sequences ({scratch / 2**30:.2f} GiB)")


def check_bytes_beside_scratch(config: Config, pages: int, page_bytes: int, free: int,
                               scratch: int, others: int, program: tuple[int, ...]) -> None:
    """ConfigError where KV pages given in bytes leave no room for the largest step
    program's XLA scratch and the step's other state (it would run out of memory at
    warm-up, after every other program had compiled)."""
    need = pages * page_bytes + scratch + others
    if need <= free:
        return
    fits = max(0, free - scratch - others) // page_bytes * page_bytes
    raise ConfigError(
        f"cache.kv_cache_memory={config.cache.kv_cache_memory:.0f} bytes per device of KV "
        f"pages, {scratch_words(scratch, program)} and the step's other state "
        f"({others} bytes) need {need} bytes, but the device with least free memory has "
        f"{free} bytes free after the weights: give the pages at most {fits} bytes, or a "
        "fraction of free memory (it leaves the scratch its room), or lower "
        "scheduler.max_num_batched_tokens and runner.token_buckets")
