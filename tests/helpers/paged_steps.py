"""Paged attention steps for the kernel tests: random pages behind shuffled page tables,
the reference output, and interpreted kernel checks run in a child process; and the
attention metadata of one sequence's chunk, for the model tests."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.llama import AttentionMetadata
from pallas_kernels.paged_attention import ragged_paged_attention_reference


def one_sequence(pages: np.ndarray, start: int, n: int, page_size: int) -> AttentionMetadata:
    """Tokens start..start + n of one sequence whose K/V go to `pages` (its page table)."""
    pos = np.arange(start, start + n)
    return AttentionMetadata(
        positions=jnp.asarray(pos, jnp.int32),
        slot_mapping=jnp.asarray(pages[pos // page_size] * page_size + pos % page_size,
                                 jnp.int32),
        page_tables=jnp.asarray(pages[None]),
        seq_lens=jnp.asarray([start + n], jnp.int32),
        query_start=jnp.asarray([0, n], jnp.int32))


def paged_step(seqs, page, num_tokens, heads=4, kv_heads=2, head_dim=64, seed=0):
    """Random pages, tables in a shuffled order, and q for sequences of (context, query
    tokens); this step's rows are the last query tokens of each context."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-max(c for c, _ in seqs) // page)
    shape = (2, 1 + len(seqs) * pages_per_seq, page, kv_heads, head_dim)
    tables = 1 + rng.permutation(len(seqs) * pages_per_seq).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum([n for _, n in seqs])]).astype(np.int32)
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    return dict(q=bf16(rng.standard_normal((num_tokens, heads, head_dim))),
                k_pages=bf16(rng.standard_normal(shape)), v_pages=bf16(rng.standard_normal(shape)),
                layer=jnp.int32(1), page_tables=jnp.asarray(tables.reshape(len(seqs), -1)),
                seq_lens=jnp.asarray([c for c, _ in seqs], jnp.int32),
                query_start=jnp.asarray(query_start))


def reference(step, scale):
    with jax.default_matmul_precision("highest"):
        return np.asarray(ragged_paged_attention_reference(**step, sm_scale=scale), np.float32)


INTERPRETER_THREADS = 32


def run_interpreted_checks(test_file: str, limit_s: int):
    """`interpreted_checks()` of the test module test_file, on CPU, in a child process with a
    time limit: a deadlock must fail the test, not hang the suite.

    Mosaic GPU's interpreter runs each simulated GPU thread as a computation that blocks in
    host callbacks (barriers, TMA waits) and runs more computations from those callbacks. Two
    of XLA's CPU limits then let it wait on itself forever (seen with gdb on a 2-core machine),
    and the child lifts both:
    * the thread pool, one thread per core: both threads blocked in callbacks, and the
      kernel's threads waited for inputs that no free thread could compute. The child's pool
      gets INTERPRETER_THREADS threads (`PJRT_NPROC`);
    * the 32 computations a device may have in flight: ops dispatched behind the kernel took
      them all, and a callback's computation waited for one. The child dispatches
      synchronously (`jax_cpu_enable_async_dispatch` off), so nothing queues behind it."""
    path = pathlib.Path(test_file)
    code = (f"import sys; sys.path[:0] = sys.argv[1:]; "
            f"import {path.stem} as t; t.interpreted_checks()")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path.parent),
                               str(pathlib.Path(__file__).parent)],
                              capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, "JAX_PLATFORMS": "cpu",
                                   "PJRT_NPROC": str(INTERPRETER_THREADS),
                                   "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"the interpreted kernel did not finish in {limit_s} s (a deadlock)")
    assert done.returncode == 0, done.stderr[-4000:]
