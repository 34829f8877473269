"""The device side of the engine: padded step inputs, jitted steps, buckets, warm-up.

One jitted step runs the model on a ragged batch (prefill chunks and decodes together) and
samples one token per sequence, all on the device. The KV pages and the per-slot penalty
tables are donated, so XLA updates them in place. Input sizes are padded to a finite set
of (tokens, sequences) buckets, each compiled ahead of time at warm-up.

Overlap: a decode's input token may come from the previous step's sampled tokens, still on
the device (`prev_index`), so the host dispatches step N+1 before it reads step N back.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxserve.config import Config
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.request import MAX_STOP_TOKEN_IDS, Request
from jaxserve.engine.sampling import SamplerOutput, SamplingInputs, sample
from jaxserve.engine.scheduler import SchedulerOutput
from jaxserve.errors import ConfigError
from jaxserve.models.llama import AttentionMetadata, LlamaModel
from jaxserve.models.model_config import ModelConfig
from sharding import rules


class _CompileCounter:
    """Counts XLA backend compilations in this process (jax.monitoring events)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                self.count += 1


@functools.cache
def compile_counter() -> _CompileCounter:
    return _CompileCounter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array  # [T] host-known input tokens
    prev_index: jax.Array  # [T] row of the previous step's tokens to use instead (-1: none)
    token_slot: jax.Array  # [T] penalty-table slot of the token's request (R: padding)
    token_is_output: jax.Array  # [T] bool: position >= prompt length (counts for penalties)
    meta: AttentionMetadata
    logits_indices: jax.Array  # [S] last token of each sequence
    row_slots: jax.Array  # [S] penalty-table slot of each sequence (R: padding)
    reset_slots: jax.Array  # [S] slots whose tables restart this step (R: none)
    sampling: SamplingInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    k_pages: jax.Array  # [L, N, page_size, KVH, D]
    v_pages: jax.Array  # [L, N, page_size, KVH, D]
    prompt_mask: jax.Array  # [R, V] bool
    output_counts: jax.Array  # [R, V] int32


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its device outputs and which requests sampled in which row."""

    rows: list[tuple[Request, bool]]  # (request, samples) per sequence row
    out: SamplerOutput
    prev_tokens: jax.Array  # [S_max] sampled tokens, padded, for the next step's inputs

    def fetch(self) -> SamplerOutput:
        return jax.device_get(self.out)


def pick_attention(backend: str):
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "reference"
    if backend == "pallas":
        if jax.default_backend() != "gpu":
            raise ConfigError("runner.attention_backend: pallas needs a GPU (this is "
                              f"{jax.default_backend()}); use auto or reference")
        from pallas_kernels.paged_attention import ragged_paged_attention
        return ragged_paged_attention
    from pallas_kernels.paged_attention import ragged_paged_attention_reference
    return ragged_paged_attention_reference


def num_kv_pages(config: Config, model: ModelConfig, mesh) -> int:
    """Pages that fit the configured KV budget (bytes, or a fraction of free memory)."""
    dtype_bytes = jnp.dtype(config.model.dtype).itemsize
    tp = mesh.shape.get("tensor", 1)
    heads_per_device = max(1, model.num_kv_heads // tp)
    page_bytes = 2 * model.num_layers * config.cache.page_size * heads_per_device \
        * model.head_dim * dtype_bytes
    budget = config.cache.kv_cache_memory
    if budget <= 1:
        stats = mesh.devices.flat[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            raise ConfigError("cache.kv_cache_memory is a fraction, but this device reports no "
                             "memory size; give a byte count instead")
        budget = budget * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(budget // page_bytes)


class Runner:
    def __init__(self, config: Config, model_config: ModelConfig, params, mesh, eos_ids):
        self.config = config
        self.model_config = model_config
        self.mesh = mesh
        self.params = params
        self.dtype = jnp.dtype(config.model.dtype)
        self.page_size = config.cache.page_size
        self.pages_per_seq = -(-config.cache.max_model_len // self.page_size)
        self.max_seqs = config.runner.seq_buckets[-1]
        self.num_slots = config.scheduler.max_num_seqs
        self.num_top = config.runner.max_logprobs
        self.eos_ids = tuple(eos_ids)
        self.num_banned = MAX_STOP_TOKEN_IDS + len(self.eos_ids)
        self.num_pages = num_kv_pages(config, model_config, mesh)
        if (self.num_pages - 1) * self.page_size < config.cache.max_model_len:
            raise ConfigError(
                f"cache.kv_cache_memory holds {self.num_pages} pages of {self.page_size} tokens, "
                f"fewer than one sequence of cache.max_model_len={config.cache.max_model_len}")
        self.model = LlamaModel(model_config, self.dtype,
                                pick_attention(config.runner.attention_backend),
                                min(config.runner.scan_unroll, model_config.num_layers))
        self._free_slots = list(range(self.num_slots))
        self._slot_of: dict[str, int] = {}
        self.state = self._init_state()
        self._prev_tokens = jax.device_put(np.zeros(self.max_seqs, np.int32), self._replicated)
        self._compiled: dict[tuple[int, int], object] = {}
        self._jitted = jax.jit(self._step, donate_argnums=(1,))
        compile_counter()

    # ----- device state ----------------------------------------------------------------
    @property
    def _replicated(self):
        return rules.replicated(self.mesh)

    def _init_state(self) -> DeviceState:
        c = self.model_config
        kv_shape = (c.num_layers, self.num_pages, self.page_size, c.num_kv_heads, c.head_dim)
        kv_names = ("cache_layers", "cache_pages", "cache_page_slots", "kv_heads", "head_dim")
        kv_sharding = rules.sharding_for(kv_names, kv_shape, self.mesh)
        table = (self.num_slots, c.vocab_size)
        zeros = lambda shape, dtype, sharding: jax.jit(
            lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        return DeviceState(
            zeros(kv_shape, self.dtype, kv_sharding),
            zeros(kv_shape, self.dtype, kv_sharding),
            zeros(table, jnp.bool_, self._replicated),
            zeros(table, jnp.int32, self._replicated),
        )

    def release(self, request_id: str) -> None:
        """Give back a finished or preempted request's penalty slot."""
        slot = self._slot_of.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    @property
    def num_compilations(self) -> int:
        return compile_counter().count

    # ----- the jitted step -------------------------------------------------------------
    def _step(self, params, state: DeviceState, inp: StepInputs, prev_tokens):
        tokens = jnp.where(inp.prev_index >= 0,
                           prev_tokens[jnp.maximum(inp.prev_index, 0)], inp.token_ids)
        r = self.num_slots  # out-of-range slot: writes are dropped
        prompt_mask = state.prompt_mask.at[inp.reset_slots].set(False, mode="drop")
        counts = state.output_counts.at[inp.reset_slots].set(0, mode="drop")
        prompt_mask = prompt_mask.at[jnp.where(inp.token_is_output, r, inp.token_slot),
                                     tokens].set(True, mode="drop")
        counts = counts.at[jnp.where(inp.token_is_output, inp.token_slot, r),
                           tokens].add(1, mode="drop")
        logits, (k_pages, v_pages) = self.model.apply(
            {"params": params}, tokens, (state.k_pages, state.v_pages), inp.meta,
            inp.logits_indices)
        rows = jnp.minimum(inp.row_slots, r - 1)
        out = sample(logits, prompt_mask[rows], counts[rows], inp.sampling, self.num_top)
        next_prev = jnp.zeros(self.max_seqs, jnp.int32).at[: out.tokens.shape[0]].set(out.tokens)
        return DeviceState(k_pages, v_pages, prompt_mask, counts), out, next_prev

    def _executable(self, num_tokens: int, num_seqs: int):
        key = (num_tokens, num_seqs)
        if key not in self._compiled:
            inputs = self._abstract_inputs(num_tokens, num_seqs)
            lowered = self._jitted.lower(self.params, self.state, inputs, self._prev_tokens)
            self._compiled[key] = lowered.compile()
        return self._compiled[key]

    def bucket_pairs(self) -> list[tuple[int, int]]:
        tokens, seqs = self.config.runner.token_buckets, self.config.runner.seq_buckets
        pairs = []
        for t in tokens:
            for i, s in enumerate(seqs):
                if s <= t or (i > 0 and seqs[i - 1] < t):
                    pairs.append((t, s))
        return pairs

    def warm_up(self, progress: bool = True) -> None:
        """Compile every bucket now, so serving never compiles."""
        setup_compilation_cache(self.config.runner.compilation_cache_dir)
        pairs = self.bucket_pairs()
        for t, s in tqdm(pairs, desc="compiling buckets", disable=not progress, unit="bucket"):
            self._executable(t, s)

    # ----- building inputs -------------------------------------------------------------
    def _bucket(self, buckets, n: int, what: str) -> int:
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"{what}={n} exceeds the largest bucket {buckets[-1]}")
        return buckets[i]

    def _slot(self, req: Request) -> tuple[int, bool]:
        """The request's penalty-table slot, and whether it was just assigned."""
        if req.request_id in self._slot_of:
            return self._slot_of[req.request_id], False
        self._slot_of[req.request_id] = self._free_slots.pop()
        return self._slot_of[req.request_id], True

    def execute(self, sched: SchedulerOutput, page_table: PageTable,
                prev: StepHandle | None) -> StepHandle:
        """Build inputs for the scheduled sequences and dispatch one step (does not wait)."""
        bucket, inputs = self.prepare(sched, page_table, prev)
        for seq in sched.seqs:
            if seq.samples:
                seq.request.num_pending += 1
        prev_tokens = prev.prev_tokens if prev is not None else self._prev_tokens
        state, out, next_prev = self._executable(*bucket)(self.params, self.state, inputs,
                                                          prev_tokens)
        self.state = state
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()
        return StepHandle([(s.request, s.samples) for s in sched.seqs], out, next_prev)

    def prepare(self, sched: SchedulerOutput, page_table: PageTable,
                prev: StepHandle | None) -> tuple[tuple[int, int], StepInputs]:
        """The (tokens, sequences) bucket and the padded step inputs, on the device."""
        n_tok = sched.num_tokens
        n_seq = len(sched.seqs)
        T = self._bucket(self.config.runner.token_buckets, n_tok, "tokens")
        S = self._bucket(self.config.runner.seq_buckets, n_seq, "sequences")
        host = _HostInputs(T, S, self.pages_per_seq, self.num_slots, self.num_banned)
        prev_row = {}
        if prev is not None:
            prev_row = {id(req): i for i, (req, samples) in enumerate(prev.rows) if samples}

        q = 0
        for row, seq in enumerate(sched.seqs):
            req = seq.request
            slot, fresh = self._slot(req)
            known = req.all_token_ids
            n = seq.num_tokens
            positions = np.arange(seq.start, seq.start + n)
            for j, p in enumerate(positions):
                if p < len(known):
                    host.token_ids[q + j] = known[p]
                else:  # the token sampled by the previous step, still on the device
                    host.prev_index[q + j] = prev_row[id(req)]
            host.positions[q:q + n] = positions
            host.slot_mapping[q:q + n] = page_table.slots(req.request_id, seq.start,
                                                               seq.start + n)
            host.token_slot[q:q + n] = slot
            host.token_is_output[q:q + n] = positions >= req.num_prompt_tokens
            pages = page_table.pages(req.request_id)
            host.page_tables[row, :len(pages)] = pages
            host.seq_lens[row] = seq.start + n
            host.query_start[row + 1] = q + n
            host.logits_indices[row] = q + n - 1
            host.row_slots[row] = slot
            if fresh:
                host.reset_slots[row] = slot
            host.set_sampling(row, req, self.eos_ids)
            q += n
        host.query_start[n_seq + 1:] = q
        return (T, S), jax.device_put(host.to_inputs(), self._replicated)

    def _abstract_inputs(self, num_tokens: int, num_seqs: int) -> StepInputs:
        host = _HostInputs(num_tokens, num_seqs, self.pages_per_seq, self.num_slots,
                           self.num_banned)
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated),
            host.to_inputs())


class _HostInputs:
    """Numpy buffers for one step, padded to a (T, S) bucket."""

    def __init__(self, T: int, S: int, P: int, num_slots: int, num_banned: int):
        i32 = lambda *shape, fill=0: np.full(shape, fill, np.int32)
        self.token_ids = i32(T)
        self.prev_index = i32(T, fill=-1)
        self.token_slot = i32(T, fill=num_slots)
        self.token_is_output = np.zeros(T, bool)
        self.positions = i32(T, fill=-1)
        self.slot_mapping = i32(T)  # padding writes into the null page
        self.page_tables = i32(S, P)
        self.seq_lens = i32(S)
        self.query_start = i32(S + 1)
        self.logits_indices = i32(S)
        self.row_slots = i32(S, fill=num_slots)
        self.reset_slots = i32(S, fill=num_slots)
        self.temperature = np.zeros(S, np.float32)
        self.top_k = i32(S)
        self.top_p = np.ones(S, np.float32)
        self.min_p = np.zeros(S, np.float32)
        self.repetition_penalty = np.ones(S, np.float32)
        self.presence_penalty = np.zeros(S, np.float32)
        self.frequency_penalty = np.zeros(S, np.float32)
        self.seeds = np.zeros(S, np.uint32)
        self.output_index = i32(S)
        self.banned = i32(S, num_banned, fill=-1)

    def set_sampling(self, row: int, req: Request, eos_ids: tuple[int, ...]) -> None:
        p = req.params
        self.temperature[row] = p.temperature
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.min_p[row] = p.min_p
        self.repetition_penalty[row] = p.repetition_penalty
        self.presence_penalty[row] = p.presence_penalty
        self.frequency_penalty[row] = p.frequency_penalty
        self.seeds[row] = req.seed
        index = req.num_tokens - req.num_prompt_tokens
        self.output_index[row] = index
        if index < p.min_tokens:
            banned = list(p.stop_token_ids) + list(eos_ids)
            self.banned[row, :len(banned)] = banned

    def to_inputs(self) -> StepInputs:
        meta = AttentionMetadata(self.positions, self.slot_mapping, self.page_tables,
                                 self.seq_lens, self.query_start)
        sampling = SamplingInputs(self.temperature, self.top_k, self.top_p, self.min_p,
                                  self.repetition_penalty, self.presence_penalty,
                                  self.frequency_penalty, self.seeds, self.output_index,
                                  self.banned)
        return StepInputs(self.token_ids, self.prev_index, self.token_slot,
                          self.token_is_output, meta, self.logits_indices, self.row_slots,
                          self.reset_slots, sampling)


def setup_compilation_cache(directory: str | None) -> None:
    """Enable JAX's persistent compilation cache, so a second start skips compiling."""
    if not directory:
        return
    path = os.path.expanduser(directory)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
