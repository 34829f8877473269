"""The device side of the engine: jitted steps, buckets, warm-up, the KV cache.

Step inputs are built on the host by batch_builder.py (buckets, penalty slots, packed
buffers); this module compiles, dispatches and, over several processes, mirrors the steps.

One jitted step runs the model on a ragged batch (prefill chunks and decodes together) and
samples one token per sequence, all on the device. The KV pages and the per-slot penalty
tables are donated, so XLA updates them in place. Input sizes are padded to a finite set
of (tokens, sequences) buckets, each compiled ahead of time at warm-up.

Overlap: a decode's input token may come from the previous step's sampled tokens, still on
the device (`prev_index`), so the host dispatches step N+1 before it reads step N back.
On a GPU the compiled call itself (0.4-0.6 ms of host time at B=64) is made by a dispatch
thread, while the engine's thread reads back and processes step N (runner.dispatch_thread).

Meshes: the step runs under `jax.shard_map` over the whole mesh, so every collective in it
is one we wrote. Each `data` shard runs its own sequences on its own KV pages and penalty
slots (step inputs carry a leading [D] axis); within a shard, the `tensor` ranks hold their
slices of the weights and their own KV heads (sharding/tensor.py), and all-reduce after the
row-parallel projections. The KV cache is never gathered, moved or reduced.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxserve.config import Config, make_dir
from jaxserve.engine import step_outputs
from jaxserve.engine.batch_builder import BatchBuilder, MicroBatch
from jaxserve.engine.decode_loop import decode_steps
from jaxserve.engine.device_step import PIPELINE_AXIS, DeviceState, StepFn
from jaxserve.engine.heap import freeze_startup
from jaxserve.engine.kv_memory import (
    check_bytes_beside_scratch,
    check_pages,
    free_device_bytes,
    kv_budget,
    kv_dtype,
    kv_page_bytes,
    num_kv_pages,
    pages_beside_scratch,
    per_device_bytes,
    scratch_words,
)
from jaxserve.engine.multihost import Message, Op, StepChannel
from jaxserve.engine.page_table import PageTable
from jaxserve.engine.program_cache import ProgramCache
from jaxserve.engine.request import Request
from jaxserve.engine.sampling import SamplerOutput
from jaxserve.engine.scheduler import SchedulerOutput
from jaxserve.engine.step_inputs import HostInputs, Layout, StepInputs
from jaxserve.errors import ConfigError
from jaxserve.models.llama import (
    LlamaModel,
    has_fused_gate_up,
    has_fused_qkv,
    has_layer_arrays,
)
from jaxserve.models.model_config import ModelConfig
from pallas_kernels.cpu_decode_attention import available as cpu_attention_available
from pallas_kernels.cpu_matmul import available as cpu_matmul_available
from sharding import rules
from sharding.pipeline import PipelinePlan
from sharding.tensor import TensorPlan

TENSOR_AXIS = "tensor"
EXPERT_AXIS = "expert"


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


@dataclasses.dataclass
class StepHandle:
    """A dispatched step: its device outputs and which request sampled in which row."""

    rows: list[tuple[Request, int, int]]  # (request, data shard, row) of each sampled token
    # (out, prev_tokens) once the step's call has been made (by the dispatch thread, or
    # already); a call that raised raises here
    call: concurrent.futures.Future
    sampled_rows: int  # J: rows sampled per sequence (a multi-step call's: its steps)
    num_top: int  # N: top logprobs per row
    steps: int = 1  # decode steps in the call (multi-step decode: > 1)

    @property
    def out(self) -> jax.Array:
        """[D, P, S, W] packed sampler output (step_outputs.py); the last stage's ([:, -1])
        are the samples."""
        return self.call.result()[0]

    @property
    def prev_tokens(self) -> jax.Array:
        """[D, P, S_max] tokens each stage received, for the next step."""
        return self.call.result()[1]

    def fetch(self) -> SamplerOutput:
        """The samples [D, S, ...] as numpy views of one device-to-host transfer."""
        return step_outputs.unpack(np.asarray(jax.device_get(self.out))[:, -1],
                                   self.sampled_rows, self.num_top)


def step_compiler_options(platform: str, num_tokens: int = 0) -> dict[str, str | bool]:
    """XLA options for compiling a step program of `num_tokens` tokens on `platform`.

    On a GPU, XLA's rematerialization pass is left out. Its memory limit counts the donated
    KV cache more than once, so every step program looks over the limit whatever the
    cache's size (docs/performance.md, "Serving sweep: Llama-3-8B shape, one H200"), and
    the pass recomputes what small buffers it can once per layer: the attention's zeroed
    output and its work-item table. In the 8B shape's B=1 and B=32 steps on one H100 that was
    90 of 572 kernels, with the same tokens without it (docs/performance.md, "XLA's
    rematerialization off for step programs").

    Programs of at least CUBLAS_ONLY_MIN_TOKENS tokens (prefill) also leave XLA's Triton
    GEMMs out: their products all go to cuBLAS, which adds the residual stream in its
    epilogue (beta = 1) where a Triton GEMM's fusion wrote it apart (docs/performance.md,
    "Prefill GEMMs all on cuBLAS"). Smaller programs (decode) keep Triton's split-K GEMVs."""
    if platform != "gpu":
        return {}
    options: dict[str, str | bool] = {"xla_disable_hlo_passes": "rematerialization"}
    if num_tokens >= CUBLAS_ONLY_MIN_TOKENS:
        options["xla_gpu_enable_triton_gemm"] = False
    return options


def flash_prefill_unsupported(dtype, head_dim: int) -> str | None:
    """Why the Mosaic GPU flash kernel (pallas_kernels/flash_prefill.py) cannot take fresh
    prompts here, or None when it can."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if device.platform != "gpu" or not capability.startswith("9."):
        return f"it needs a Hopper GPU (compute capability 9.x); this is {device.device_kind}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it needs a bfloat16 or float16 model; this one computes in {jnp.dtype(dtype)}"
    if head_dim not in (64, 128):
        return f"it needs head_dim 64 or 128; this model has {head_dim}"
    return None


def pick_attention(backend: str, *, decode_only: bool = False, dtype=jnp.bfloat16,
                   head_dim: int = 128, paged_prefill: bool | None = None, pages_dtype=None,
                   page_size: int = 16, kv_writer: bool = False):
    """The attention function of runner.attention_backend. decode_only: for programs whose
    sequences each have one query token (multi-step decode), where the Pallas kernel leaves
    its prefill launch out. auto: on a Hopper GPU, pallas_flash where the model fits it.
    paged_prefill (runner.paged_prefill): whether pallas_flash also gives later chunks of
    PAGED_MIN_CHUNK tokens or more to the Mosaic GPU paged prefill kernel, which must take
    the KV pages (pages_dtype, default dtype; page_size): None where it does, True always
    (ConfigError where it cannot), False never. kv_writer: a Pallas choice also applies RoPE
    and writes the layers' new K/V rows with one kernel (pallas_kernels/rope_kv_write.py;
    the model says where it applies)."""
    from pallas_kernels.paged_attention import unsupported_head_dim
    if backend == "auto":
        backend = "pallas" if jax.default_backend() == "gpu" else "reference"
        if backend == "pallas" and (reason := unsupported_head_dim(head_dim)):
            _note_once(f"jaxserve: note: attention_backend auto uses the reference attention "
                       f"(slower) on this GPU: the Pallas kernels {reason}")
            backend = "reference"
        if backend == "pallas" and flash_prefill_unsupported(dtype, head_dim) is None:
            backend = "pallas_flash"
        if paged_prefill and backend != "pallas_flash":
            print(f"jaxserve: note: runner.paged_prefill: true is not used: attention_backend "
                  f"auto picked {backend} here (the kernel needs pallas_flash)",
                  file=sys.stderr, flush=True)
    if backend in ("pallas", "pallas_flash"):
        if jax.default_backend() != "gpu":
            raise ConfigError(f"runner.attention_backend: {backend} needs a GPU (this is "
                              f"{jax.default_backend()}); use auto or reference")
        if reason := unsupported_head_dim(head_dim):
            raise ConfigError(f"runner.attention_backend: {backend}: the Pallas kernels "
                              f"{reason}; use auto or reference")
        fn = _pallas_attention(backend, decode_only, dtype, head_dim, paged_prefill,
                               pages_dtype, page_size)
        return _with_kv_writer(fn) if kv_writer else fn
    from pallas_kernels.paged_attention import ragged_paged_attention_reference
    return ragged_paged_attention_reference


def pick_swiglu(config: Config, dtype, head_dim: int, layer_arrays: bool):
    """The gate/up product with SwiGLU in its epilogue (pallas_kernels/swiglu_matmul_mgpu.py)
    for step programs of SWIGLU_MIN_TOKENS tokens or more, where the Mosaic GPU kernels
    serve (attention_backend auto or pallas_flash on a Hopper GPU, a bf16 / f16 model) and
    each layer's gate_up is a plain array of its own (layer_arrays, unquantized, not stored
    outputs-first); else None: XLA's GEMM and SwiGLU fusion."""
    if config.runner.attention_backend not in ("auto", "pallas_flash"):
        return None
    if jax.default_backend() != "gpu" or flash_prefill_unsupported(dtype, head_dim):
        return None
    if not layer_arrays or config.model.quantization != "none" \
            or config.runner.transposed_weights:
        return None
    from pallas_kernels.swiglu_matmul_mgpu import PrefillSwiglu
    return PrefillSwiglu(min_tokens=SWIGLU_MIN_TOKENS)


@functools.cache
def _note_once(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _pallas_attention(backend, decode_only, dtype, head_dim, paged_prefill, pages_dtype,
                      page_size):
    from pallas_kernels.paged_attention import ragged_paged_attention
    if decode_only:
        return functools.partial(ragged_paged_attention, decode_only=True)
    if backend == "pallas":
        return ragged_paged_attention
    reason = flash_prefill_unsupported(dtype, head_dim)
    if reason:
        raise ConfigError(f"runner.attention_backend: pallas_flash: {reason}; use pallas "
                          "or auto")
    from pallas_kernels.flash_prefill import ragged_paged_attention_flash
    if paged_prefill is False:
        return ragged_paged_attention_flash
    from pallas_kernels.paged_prefill_mgpu import unsupported
    reason = unsupported(jnp.dtype(dtype), jnp.dtype(pages_dtype or dtype), head_dim,
                         page_size)
    if reason and paged_prefill:
        raise ConfigError(f"runner.paged_prefill: the Mosaic paged prefill kernel: "
                          f"{reason}; set it false or null")
    if reason:
        return ragged_paged_attention_flash
    chunks = functools.partial(ragged_paged_attention_flash, min_chunk=PAGED_MIN_CHUNK)
    chunks.takes_new_kv = True
    return chunks


def _with_kv_writer(attention):
    """A Pallas attention function whose layers apply RoPE and write their new K/V rows with
    one kernel (pallas_kernels/rope_kv_write.py) instead of XLA's RoPE fusion and two
    scatters."""
    from pallas_kernels.rope_kv_write import rope_and_write_kv
    fn = functools.partial(attention.func, *attention.args, **attention.keywords) \
        if isinstance(attention, functools.partial) else functools.partial(attention)
    fn.takes_new_kv = getattr(attention, "takes_new_kv", False)
    fn.rope_kv_writer = rope_and_write_kv
    return fn


# GPU step programs of at least this many tokens leave XLA's Triton GEMMs out
# (step_compiler_options).
CUBLAS_ONLY_MIN_TOKENS = 512
# Step programs of at least this many tokens take gate/up and SwiGLU from one Mosaic GPU
# kernel (pick_swiglu): on one H100 it took 0.96x the time of XLA's GEMM and fusion at 2048
# tokens, 0.92x at 8192 and 1.03x at 512 (docs/performance.md, "gate/up with SwiGLU in one
# kernel").
SWIGLU_MIN_TOKENS = 1024
# pallas_flash: only programs of at least this many tokens carry the flash kernel (a fresh
# prompt there is worth its launch); smaller ones, decode batches, keep the ragged kernel.
FLASH_MIN_TOKENS = 512
# The reference attention: programs of at least this many tokens (the CPU demo's prefill
# buckets) pass it this step's K/V rows.
REFERENCE_ROWS_MIN_TOKENS = 64
# Threads that load saved step programs at warm-up (Runner._load_saved): on a 2-core machine
# the demo's 24 programs load in 2.1 s on two threads, 3.4-3.5 s on one.
LOAD_THREADS = min(4, os.cpu_count() or 1)
# runner.paged_prefill: later chunks of at least this many tokens go to the Mosaic GPU paged
# prefill kernel (its smallest item; from 128 up it measured 1.0-2.2x the ragged kernel).
PAGED_MIN_CHUNK = 128

def check_cache(config: Config, model: ModelConfig, mesh) -> None:
    """What can be checked of the cache before the weights load: runner.max_logprobs within
    the vocabulary, and a KV budget given in bytes that holds one sequence of
    cache.max_model_len (a fraction of free memory is known once the weights are in)."""
    _check_logprobs(config, model)
    budget = kv_budget(config, mesh.local_devices)
    if budget > 1:
        kv_heads = TensorPlan.for_model(model, mesh.shape[TENSOR_AXIS]).kv_heads
        slots = PipelinePlan.make(model.num_layers, mesh.shape[PIPELINE_AXIS],
                                  config.mesh.pipeline_layers).slots
        page = kv_page_bytes(config, model, kv_heads, slots)
        check_pages(config, int(budget // page), page)


def _check_logprobs(config: Config, model: ModelConfig) -> None:
    if config.runner.max_logprobs > model.vocab_size:
        raise ConfigError(f"runner.max_logprobs: {config.runner.max_logprobs} is more than "
                          f"the model's vocabulary of {model.vocab_size} tokens")


class Runner:
    def __init__(self, config: Config, model_config: ModelConfig, params, mesh, eos_ids):
        self.config = config
        self.model_config = model_config
        self.mesh = mesh
        self.params = params
        self.dtype = jnp.dtype(config.model.dtype)
        self.page_size = config.cache.page_size
        self.max_seqs = config.runner.seq_buckets[-1]
        self.num_slots = config.scheduler.max_num_seqs  # penalty slots per data shard
        self.num_top = config.runner.max_logprobs
        _check_logprobs(config, model_config)
        self.num_shards = mesh.shape["data"]
        self.stages = mesh.shape[PIPELINE_AXIS]
        # Arrays with leading [D, P] axes (step inputs, sampled tokens): a block per data
        # shard and pipeline stage.
        self._per_block = jax.sharding.NamedSharding(
            mesh, rules.logical_to_spec(("batch", "stage"), mesh))
        self.plan = TensorPlan.for_model(model_config, mesh.shape[TENSOR_AXIS])
        self.pipeline = PipelinePlan.make(model_config.num_layers, self.stages,
                                          config.mesh.pipeline_layers)
        self.num_pages = num_kv_pages(config, model_config, mesh, self.plan.kv_heads,
                                      self.pipeline.slots)
        check_pages(config, self.num_pages,
                    kv_page_bytes(config, model_config, self.plan.kv_heads,
                                  self.pipeline.slots))
        local = dataclasses.replace(self.plan.per_device(model_config),
                                    num_layers=self.pipeline.slots)
        experts, tensor = mesh.shape[EXPERT_AXIS], mesh.shape[TENSOR_AXIS]
        # One kernel for RoPE and the K/V writes where the layers are unrolled (Flax's scan
        # cannot hold it); the model decides per layer where it applies.
        writer = has_layer_arrays(params)
        attention = pick_attention(config.runner.attention_backend, dtype=self.dtype,
                                   head_dim=model_config.head_dim,
                                   paged_prefill=config.runner.paged_prefill,
                                   pages_dtype=kv_dtype(config), page_size=self.page_size,
                                   kv_writer=writer)
        from pallas_kernels.paged_attention import ragged_paged_attention_reference
        reference = attention is ragged_paged_attention_reference
        cpu_kernels = use_cpu_kernels(config)
        if reference and cpu_kernels:  # its decode tokens by pallas_kernels/cpu_decode_attention
            attention = functools.partial(ragged_paged_attention_reference, cpu_kernel=True)
        model = LlamaModel(local, self.dtype, attention,
                           min(config.runner.scan_unroll, local.num_layers),
                           # no collectives over an axis of one device: XLA's CPU backend
                           # runs each as a copy (61 a step on the demo)
                           tensor_axis=TENSOR_AXIS if tensor > 1 else None,
                           expert_axis=EXPERT_AXIS if experts > 1 else None,
                           expert_shards=experts, kv_rotation=config.cache.kv_rotation,
                           layer_arrays=has_layer_arrays(params),
                           fused_qkv=has_fused_qkv(params),
                           fused_gate_up=has_fused_gate_up(params),
                           layer_loop=config.runner.layer_loop,
                           transposed=config.runner.transposed_weights,
                           quantized_activations=(config.runner.fp8_activations
                                                  or config.runner.int8_activations),
                           q8_0_tiles=config.runner.q8_0_tiles,
                           cpu_matmul=cpu_kernels and config.runner.transposed_weights,
                           swiglu=pick_swiglu(config, self.dtype, model_config.head_dim,
                                              has_layer_arrays(params)))
        self._step = StepFn(model, self.stages, self.num_slots, self.max_seqs, self.num_top)
        self._prefill_step = self._step  # programs of self._prefill_tokens tokens or more
        self._prefill_tokens = FLASH_MIN_TOKENS
        if reference:
            # Prefill programs hand it this step's K/V rows: on a CPU its window formulation
            # reads a chunk's own keys from them instead of gathering pages. Decode
            # programs pass none: with the rows in every program the demo's B=16 decode step
            # p50 measured 77.2 and 99.8 ms against 70.1 and 74.2 ms (two clean rounds).
            rows = functools.partial(ragged_paged_attention_reference, cpu_kernel=cpu_kernels)
            rows.takes_new_kv = True
            self._prefill_step = dataclasses.replace(
                self._step, model=model.clone(attention_fn=rows))
            self._prefill_tokens = REFERENCE_ROWS_MIN_TOKENS
        elif getattr(attention, "takes_new_kv", False):
            self._step = dataclasses.replace(
                self._step, model=model.clone(attention_fn=pick_attention("pallas",
                                                                          kv_writer=writer)))
        # Decode-only programs (Layout.steps >= 1): the decode kernel alone, with no launch
        # for prefill chunks. On by default where the Pallas attention serves; the
        # reference attention has nothing to leave out.
        decode_programs = config.runner.decode_programs
        if decode_programs is None:
            decode_programs = not reference and self.stages == 1
        self._decode_step = self._step  # the body of decode-only programs
        if (config.scheduler.decode_steps > 1 or decode_programs) and not reference:
            decode_attention = pick_attention(config.runner.attention_backend, decode_only=True,
                                              head_dim=model_config.head_dim, kv_writer=writer)
            self._decode_step = dataclasses.replace(
                self._step, model=model.clone(attention_fn=decode_attention))
        self.batch = BatchBuilder(config, self.num_shards, self.stages, eos_ids,
                                  decode_programs)
        self.state = self._state_shapes()  # arrays once the pages are sized, below
        self._prev_tokens = self._to_global(
            np.zeros((self.num_shards, self.stages, self.max_seqs), np.int32))
        self._ring: collections.deque[MicroBatch] = collections.deque(maxlen=self.stages)
        # One thread makes the compiled calls, in order, while the engine's thread goes on
        # (runner.dispatch_thread; null: on a GPU). The batch builder's ring keeps a step's
        # input buffer unwritten until two later steps have been built, and the engine reads
        # a step back before it builds the one after the next, so a buffer waiting for its
        # call is never rewritten.
        dispatch = config.runner.dispatch_thread
        if dispatch is None:
            dispatch = jax.default_backend() == "gpu"
        self._dispatcher = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="jaxserve-step") if dispatch else None
        self._last_call: concurrent.futures.Future | None = None  # submitted to it last
        self._compiled: dict[tuple[int, int, int], object] = {}
        # Seconds each program took to trace, lower and compile, or to load whole.
        self.compile_times: dict[tuple[int, int, int, int], dict[str, float]] = {}
        cache_dir = config.runner.compilation_cache_dir
        self._programs = ProgramCache(os.path.join(cache_dir, "steps"), config, model_config,
                                      mesh.devices.flat) \
            if cache_dir and jax.process_count() == 1 else None
        # Over several processes, the leader tells the others what to run (multihost.py).
        self.channel = None
        if jax.process_count() > 1:
            d = config.distributed
            self.channel = StepChannel.connect(self._buffer_shape, port=d.step_port,
                                               timeout_s=d.init_timeout_s)
        compile_counter()
        self.kv_sizing: dict | None = None  # set where the pages are fit beside the scratch
        self._fit_pages_beside_scratch()
        self.state = self._allocate(self.state)

    # ----- device state ----------------------------------------------------------------

    def _state_shapes(self) -> DeviceState:
        """The shapes, dtypes and shardings of the KV cache and penalty tables (of
        self.num_pages pages): what the step programs compile against."""
        c = self.model_config
        kv_shape = (self.stages * self.pipeline.slots, self.num_shards * self.num_pages,
                    self.page_size, self.plan.served_kv_heads, c.head_dim)
        kv_names = ("cache_layers", "cache_pages", "cache_page_slots", "kv_heads", "head_dim")
        kv_sharding = rules.sharding_for(kv_names, kv_shape, self.mesh)
        table = (self.num_shards * self.num_slots, c.vocab_size)
        table_sharding = rules.sharding_for(("batch", "sampled_vocab"), table, self.mesh)
        shape = jax.ShapeDtypeStruct
        pipe_x = history = None
        if self.stages > 1:  # what each stage hands the next
            blocks = (self.num_shards, self.stages)
            t_max = self.config.runner.token_buckets[-1]
            pipe_x = shape((*blocks, t_max, c.hidden_size), self.dtype,
                           sharding=self._per_block)
            history = shape((*blocks, self.stages, self.max_seqs), jnp.int32,
                            sharding=self._per_block)
        kv_scales = None
        if self.config.cache.kv_dtype != "auto":  # one float32 scale per (token, KV head)
            scale_sharding = rules.sharding_for(kv_names[:-1], kv_shape[:-1], self.mesh)
            kv_scales = tuple(shape(kv_shape[:-1], jnp.float32, sharding=scale_sharding)
                              for _ in range(2))
        cache = kv_dtype(self.config)
        return DeviceState(
            shape(kv_shape, cache, sharding=kv_sharding),
            shape(kv_shape, cache, sharding=kv_sharding),
            shape(table, jnp.bool_, sharding=table_sharding),
            shape(table, jnp.int32, sharding=table_sharding),
            pipe_x, history, kv_scales,
        )

    @staticmethod
    def _allocate(shapes: DeviceState) -> DeviceState:
        """Zeros of each shape, each created already sharded by a jitted fill."""
        return jax.tree.map(lambda a: jax.jit(lambda: jnp.zeros(a.shape, a.dtype),
                                              out_shardings=a.sharding)(), shapes)

    def _fit_pages_beside_scratch(self) -> None:
        """Where the devices report their memory: compile the largest step program now,
        before the pages are allocated, and read its XLA scratch. A fraction of free memory
        gives the pages no more than leaves it room; bytes that leave it none are a
        ConfigError now, not an out-of-memory after every program has compiled
        (kv_memory.py). Where the pages stay as they were, the program is the one warm-up
        would compile; where they shrink, it compiles again against the new shapes."""
        devices = self.mesh.local_devices
        free = free_device_bytes(devices)
        if free is None:
            return
        if jax.process_count() > 1:  # the same decision on every process
            free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
        top = max(self.step_programs())  # the most tokens, then sequences
        if self._programs is None or not self._programs.path(top, self._args(top)).is_file():
            print(f"jaxserve: compiling the step program of {top[0]} tokens and {top[1]} "
                  "sequences first: the KV pages are sized beside its XLA scratch",
                  file=sys.stderr, flush=True)
        program = self._executable(*top)
        try:
            scratch = program.memory_analysis().temp_size_in_bytes
        except Exception as e:  # noqa: BLE001 - a loaded program may not report it
            _note_once(f"jaxserve: note: the KV pages are sized without the step programs' "
                       f"XLA scratch: the program of {top[0]} tokens reports none ({e})")
            return
        page_bytes = kv_page_bytes(self.config, self.model_config, self.plan.kv_heads,
                                   self.pipeline.slots)
        state = self.state
        others = per_device_bytes((state.prompt_mask, state.output_counts, state.pipe_x,
                                   state.history))
        # what start-up measured (benchmarks record it)
        self.kv_sizing = {"free_bytes": free, "program": top, "scratch_bytes": scratch,
                          "other_state_bytes": others, "budget_pages": self.num_pages,
                          "pages": self.num_pages}
        budget = kv_budget(self.config, devices)
        if budget > 1:
            check_bytes_beside_scratch(self.config, self.num_pages, page_bytes, free, scratch,
                                       others, top)
            return
        pages = pages_beside_scratch(self.num_pages, page_bytes, free, scratch, others)
        if pages >= self.num_pages:
            return
        beside = f" beside {scratch_words(scratch, top)}"
        check_pages(self.config, pages, page_bytes, beside)
        unset = " (unset: the default)" if self.config.cache.kv_cache_memory is None else ""
        print(f"jaxserve: note: {pages} KV pages, not the {self.num_pages} of "
              f"cache.kv_cache_memory={budget:g}{unset}: they leave room for "
              f"{scratch_words(scratch, top)}", file=sys.stderr, flush=True)
        self.num_pages = self.kv_sizing["pages"] = pages
        self.state = self._state_shapes()
        del self._compiled[top]
        self.compile_times.pop(top, None)

    def _to_global(self, host: np.ndarray) -> jax.Array:
        """A [D, P, ...] host array (the same on every process) as a global array."""
        if jax.process_count() == 1:
            return jax.device_put(host, self._per_block)
        return jax.make_array_from_callback(host.shape, self._per_block, lambda i: host[i])

    def _buffer_shape(self, bucket: tuple[int, ...]) -> tuple[int, int, int]:
        return self.num_shards, self.stages, self.batch.layout(*bucket).size

    def release(self, request_id: str) -> None:
        """Give back a finished or preempted request's penalty slot."""
        self.batch.release(request_id)

    @property
    def num_compilations(self) -> int:
        return compile_counter().count

    # ----- the jitted step -------------------------------------------------------------
    def _sharded_step(self, layout: Layout):
        """The step under shard_map: (params, state, input buffers [D, P, ...], received
        tokens [D, P, S_max]) -> (state, packed sampler output [D, P, S, W], tokens to send
        on [D, P, S_max]). Each device gets its (data shard, stage) block."""
        spec = lambda tree: jax.tree.map(lambda a: a.sharding.spec, tree)
        per_block = self._per_block.spec
        state = spec(self.state)

        # Over several processes the leader reads every block's samples, so they are
        # gathered onto every device (a few KB); in one process each block stays put.
        gather = jax.process_count() > 1
        out_spec = jax.sharding.PartitionSpec() if gather else per_block

        def shard_step(params, state, buffer, recv):
            inp = layout.unpack(buffer[0, 0])
            if layout.steps > 1:
                state, out, send = decode_steps(self._decode_step, layout.steps, self.page_size,
                                                params, state, inp, recv[0, 0])
            elif layout.steps == 1:
                state, out, send = self._decode_step(params, state, inp, recv[0, 0])
            else:
                step = self._prefill_step if layout.T >= self._prefill_tokens else self._step
                state, out, send = step(params, state, inp, recv[0, 0])
            out = step_outputs.pack(out)[None, None]  # one array: one transfer to the host
            if gather:
                out = jax.lax.all_gather(out, ("data", PIPELINE_AXIS), axis=0,
                                         tiled=True).reshape(self.num_shards, self.stages,
                                                             *out.shape[2:])
            return state, out, send[None, None]

        # check_vma off: the LM head's all_gather leaves the logits (and so the sampled
        # tokens and tables) equal on every tensor rank, but JAX types them as varying.
        return jax.shard_map(shard_step, mesh=self.mesh,
                             in_specs=(spec(self.params), state, per_block, per_block),
                             out_specs=(state, out_spec, per_block), check_vma=False)

    def _args(self, key: tuple[int, int, int, int]) -> tuple:
        """The arguments of a step program, the inputs' buffer as its shape."""
        buffer = jax.ShapeDtypeStruct(self._buffer_shape(key), jnp.int32,
                                      sharding=self._per_block)
        return self.params, self.state, buffer, self._prev_tokens

    def _load_saved(self, keys: list, done: Callable[[], None],
                    stop: Callable[[], bool] | None) -> list:
        """Load the programs of `keys` saved whole (engine/program_cache.py) on LOAD_THREADS
        threads, calling `done` after each; returns the keys not loaded. Loading a program
        links its machine code outside the GIL, so a few threads load them in less time than
        one does."""
        def load(key):
            if stop is not None and stop():
                return key, None, 0.0
            t0 = time.perf_counter()
            program = self._programs.load(self._programs.path(key, self._args(key)))
            return key, program, time.perf_counter() - t0

        missing = []
        with concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
            for key, program, seconds in pool.map(load, keys):
                if program is None:
                    missing.append(key)
                    continue
                self._compiled[key] = program
                self.compile_times[key] = {"load": seconds}
                done()
        return missing

    def _executable(self, num_tokens: int, num_seqs: int, rows: int = 1, steps: int = 0):
        key = (num_tokens, num_seqs, rows, steps)
        if key not in self._compiled:
            t0 = time.perf_counter()
            args = self._args(key)
            saved = self._programs.path(key, args) if self._programs else None
            loaded = self._programs.load(saved) if saved else None
            if loaded is not None:
                self._compiled[key] = loaded
                self.compile_times[key] = {"load": time.perf_counter() - t0}
                return loaded
            step = jax.jit(self._sharded_step(self.batch.layout(*key)), donate_argnums=(1,))
            traced = step.trace(*args)
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            options = step_compiler_options(self.mesh.devices.flat[0].platform, key[0])
            self._compiled[key] = self._programs.compile_and_save(saved, lowered, options) \
                if saved else lowered.compile(options)
            self.compile_times[key] = {"trace": t1 - t0, "lower": t2 - t1,
                                       "compile": time.perf_counter() - t2}
        return self._compiled[key]

    def compiled_text(self, num_tokens: int, num_seqs: int, rows: int = 1) -> str:
        """The optimized HLO of one bucket's step (its collectives are checked by tests)."""
        return self._executable(num_tokens, num_seqs, rows).as_text()

    def compiled_temp_bytes(self, num_tokens: int, num_seqs: int, rows: int = 1) -> int:
        """Scratch memory one bucket's step needs on a device, besides its arguments."""
        return self._executable(num_tokens, num_seqs, rows).memory_analysis() \
            .temp_size_in_bytes

    def bucket_pairs(self) -> list[tuple[int, int]]:
        tokens, seqs = self.config.runner.token_buckets, self.config.runner.seq_buckets
        pairs = []
        for t in tokens:
            for i, s in enumerate(seqs):
                if s <= t or (i > 0 and seqs[i - 1] < t):
                    pairs.append((t, s))
        return pairs

    def step_programs(self) -> list[tuple[int, int, int, int]]:
        """Every (tokens, sequences, rows per sequence, decode steps) program serving may
        run: the general step of each bucket pair (decode steps 0); with speculative
        decoding its verifying variant too; for each bucket a decode batch lands in, the
        decode-only program of one step (runner.decode_programs) and of decode_steps steps
        (multi-step decode)."""
        rows = sorted({1, self.config.speculative.rows})
        programs = [(t, s, j, 0) for t, s in self.bucket_pairs() for j in rows]
        k = self.config.scheduler.decode_steps
        steps = ([1] if self.batch.decode_programs else []) + ([k] if k > 1 else [])
        runner, bucket = self.config.runner, self.batch.bucket
        most = min(self.num_slots, self.config.scheduler.max_num_batched_tokens)
        for n in steps:
            programs += sorted({(bucket(runner.token_buckets, b, "tokens"),
                                 bucket(runner.seq_buckets, b, "sequences"), 1, n)
                                for b in range(1, most + 1)})
        return programs

    def warm_up(self, progress: bool = True, stop: Callable[[], bool] | None = None) -> bool:
        """Compile every bucket now, so serving never compiles (the followers too). `stop`
        is asked between programs: when it says so, warm-up ends there and returns False
        (one process only: over several, every process runs the same programs)."""
        if self.channel is not None and self.channel.is_leader():
            self.channel.send(Message(Op.WARM_UP))
        if self.channel is not None:
            stop = None
        setup_compilation_cache(self.config.runner.compilation_cache_dir)
        programs = self.step_programs()
        with tqdm(total=len(programs), desc="compiling buckets", disable=not progress,
                  unit="bucket") as bar:
            pending = [p for p in programs if p not in self._compiled]
            bar.update(len(programs) - len(pending))
            if self._programs is not None:  # those saved whole first, on several threads
                pending = self._load_saved(pending, bar.update, stop)
            for bucket in pending:
                if stop is not None and stop():
                    return False
                self._executable(*bucket)
                bar.update()
        # A program's first run sets it up, and that time would land on a request: on a GPU
        # its CUDA graphs (35-90 ms measured on an H200 for the SmolLM2 shape), on a CPU the
        # library state of its matmuls (YNNPACK's; the demo's programs take 80-430 ms more
        # the first time). So each program runs once on padding here. On a CPU that costs
        # the program's full time (2.3-2.9 s for the demo's 2048 tokens), so only the
        # programs a decode step can land in run; a prefill chunk's program pays its first
        # run on its first chunk.
        for bucket in programs:
            if stop is not None and stop():
                return False
            if jax.default_backend() != "cpu" or bucket[0] <= self._decode_tokens():
                try:
                    self.run_padding(bucket)
                    jax.block_until_ready(self.state)
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    raise ConfigError(self._out_of_memory(bucket, e)) from e
        return True

    def _out_of_memory(self, bucket: tuple[int, ...], error: Exception) -> str:
        """What a step program that found no device memory at warm-up says: its bucket, its
        XLA scratch where known, and the settings that make room (the pages leave room only
        for the largest program's scratch, and only where the devices report their memory:
        another program, or the allocator, can still find too little left)."""
        try:
            temp = self._executable(*bucket).memory_analysis().temp_size_in_bytes
            scratch = f"{temp / 2**30:.2f} GiB"
        except Exception:  # a program loaded whole may not report it
            scratch = "not reported"
        given = self.config.cache.kv_cache_memory
        given = ("unset, the default" if given is None else
                 f"{given:g} of free memory" if given <= 1 else f"{given:.0f} bytes")
        said = (str(error).strip() or type(error).__name__).splitlines()[0]
        return (f"the step program of {bucket[0]} tokens and {bucket[1]} sequences ran out "
                f"of device memory at warm-up (its XLA scratch: {scratch}) beside "
                f"{self.num_pages} KV pages (cache.kv_cache_memory: {given}): give the KV "
                "pages less memory, or lower scheduler.max_num_batched_tokens and "
                f"runner.token_buckets (largest {self.config.runner.token_buckets[-1]}); "
                f"XLA: {said}")

    def _decode_tokens(self) -> int:
        """The token bucket of a step that decodes every slot (the largest a decode-only
        step runs; the largest bucket if that is smaller)."""
        runner = self.config.runner
        n = self.num_slots * self.config.speculative.rows
        return self.batch.bucket(runner.token_buckets, min(n, runner.token_buckets[-1]),
                                 "tokens")

    def run_padding(self, bucket: tuple[int, ...]) -> None:
        """Run one program on inputs that are all padding: it writes K/V only to the null
        page and leaves the penalty tables as they were."""
        host = HostInputs(self.batch.layout(*bucket), self.num_shards, self.num_slots,
                          self.stages)
        self._run(bucket, host.buffer, None)

    # ----- building inputs -------------------------------------------------------------
    def execute(self, sched: SchedulerOutput, page_tables: list[PageTable],
                prev: StepHandle | None) -> StepHandle:
        """Dispatch one step for the scheduled sequences (does not wait). With pipeline
        stages they enter stage 0, and the handle's rows are the micro-batch leaving the last
        stage."""
        self._ring.appendleft(self.batch.micro_batch(sched, page_tables,
                                                     prev.rows if prev is not None else []))
        bucket, host = self.batch.tick_inputs(list(self._ring))
        rows = self._ring[-1].rows if len(self._ring) == self.stages else []
        for seq in sched.seqs:
            if seq.samples:
                seq.request.num_pending += seq.steps
        if self.channel is not None:
            self.channel.send(Message(Op.STEP, bucket, prev is not None, host.buffer))
        prev_call = prev.call if prev is not None else None
        if self._dispatcher is not None:
            if tuple(bucket) not in self._compiled:
                # A program warm-up did not compile is traced and compiled here, under the
                # caller's JAX settings (they are per thread: default_matmul_precision), once
                # the calls before it are made (each replaces the state that tracing reads).
                if self._last_call is not None:
                    concurrent.futures.wait([self._last_call])
                self._executable(*bucket)
            call = self._last_call = self._dispatcher.submit(self._call, bucket, host.buffer,
                                                             prev_call)
        else:
            call = concurrent.futures.Future()
            call.set_result(self._call(bucket, host.buffer, prev_call))
        steps = max(bucket[3], 1)
        return StepHandle(rows, call, bucket[2] * steps, self.num_top, steps)

    def _call(self, bucket, buffer: np.ndarray, prev_call: concurrent.futures.Future | None):
        """Make one step's call and start its outputs' copy to the host: (outputs, tokens to
        send on). On the dispatch thread the previous step's call has been made (one thread
        makes them in order), so prev_call is done; if it raised, so does this one."""
        out, next_prev = self._run(bucket, buffer,
                                   prev_call.result()[1] if prev_call is not None else None)
        out.copy_to_host_async()
        return out, next_prev

    def _run(self, bucket, buffer: np.ndarray, prev_tokens):
        """Dispatch one compiled step (every process does, with the same inputs): one
        host-to-device transfer, of the packed input buffer. On one process the numpy buffer
        goes to the compiled call as it is, whose own transfer is cheaper than a
        `device_put` first (about 0.1 ms a step at B=64 on a CPU host); the batch builder
        writes a buffer again only after the step that read it has finished (its _Ring)."""
        prev_tokens = self._prev_tokens if prev_tokens is None else prev_tokens
        inputs = buffer if jax.process_count() == 1 else self._to_global(buffer)
        self.state, out, next_prev = self._executable(*bucket)(
            self.params, self.state, inputs, prev_tokens)
        return out, next_prev

    def follow(self) -> None:
        """A follower's life: run what the leader sends until it says STOP."""
        prev = None
        while (message := self.channel.receive()).op != Op.STOP:
            if message.op == Op.WARM_UP:
                self.warm_up(progress=False)
                freeze_startup()  # a pause here would hold every process's step back
            elif message.op == Op.STEP:
                _, prev = self._run(message.bucket, message.buffer,
                                    prev if message.continues else None)

    def ping(self) -> None:
        """A collective over every process: returns only if they are all there."""
        if self.channel is not None:
            self.channel.send(Message(Op.PING))

    def close(self) -> None:
        """Let the followers go (the leader, once it has finished serving), and the
        dispatch thread."""
        if self.channel is not None and self.channel.is_leader():
            self.channel.send(Message(Op.STOP))
        if self._dispatcher is not None:
            self._dispatcher.shutdown(wait=True)

    @property
    def dispatches_on_thread(self) -> bool:
        """Whether a thread of its own makes the compiled calls (runner.dispatch_thread)."""
        return self._dispatcher is not None

    @property
    def pipeline_busy(self) -> bool:
        """Micro-batches with tokens to sample are still short of the last stage, so the
        pipeline must go on ticking even with nothing new to schedule."""
        return any(mb.rows for mb in list(self._ring)[:self.stages - 1])

    def prepare(self, sched: SchedulerOutput, page_tables: list[PageTable],
                prev: StepHandle | None) -> tuple[tuple[int, ...], tuple[jax.Array, jax.Array]]:
        """The (tokens, sequences, rows) bucket and the packed inputs (a 1-tuple: the buffer
        [D, P, ...] on the device) of a step that would run these sequences (profiling)."""
        ring = [self.batch.micro_batch(sched, page_tables, prev.rows if prev is not None else []),
                *list(self._ring)[:-1]]
        bucket, host = self.batch.tick_inputs(ring[:self.stages])
        return bucket, (self._to_global(host.buffer),)

    def run_prepared(self, bucket: tuple[int, int, int], inputs, prev_tokens):
        """Run one compiled step on prepared inputs (profiling): new state, outputs, tokens."""
        return self._executable(*bucket)(self.params, self.state, *inputs, prev_tokens)

    def unpack(self, bucket: tuple[int, int, int], inputs) -> StepInputs:
        """Prepared inputs of the first data shard's stage 0 as named arrays (profiling)."""
        return self.batch.layout(*bucket).unpack(inputs[0][0, 0])


def use_cpu_kernels(config: Config) -> bool:
    """runner.cpu_kernels resolved: null is on where the backend is a CPU and the kernels run
    there (pallas_kernels/cpu_build.py); true where they cannot run is a ConfigError."""
    if config.runner.cpu_kernels is False:
        return False
    runs = jax.default_backend() == "cpu" and cpu_matmul_available() \
        and cpu_attention_available()
    if config.runner.cpu_kernels and not runs:
        raise ConfigError("runner.cpu_kernels: true needs a CPU backend with AVX-512 and a C++ "
                          f"compiler (backend: {jax.default_backend()}; see the message "
                          "above, if any); set it to null or false")
    return runs


def setup_compilation_cache(directory: str | None) -> None:
    """Enable JAX's persistent compilation cache, so a second start skips compiling."""
    if not directory:
        return
    path = make_dir(directory, "runner.compilation_cache_dir")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
