"""y [M, N] = x [M, K] . w [N, K]^T in float32 for up to 16 rows of x, on a CPU with AVX-512:
a C++ kernel (cpu_matmul.cc) behind jax.ffi, for the matmuls of decode batches.

XLA's CPU GEMM runs the demo's decode matmuls of 4-16 rows at 100-130 GFLOP/s on 2 cores,
where the weight's bytes alone would allow more than twice that, and its one-row
matrix-vector loop reads the weights more slowly than this kernel does. Up to 4 rows the
kernel takes dot products along the weight's rows; above, it holds the 16 rows' values of
one input in one register and broadcasts each weight value into it; both prefetch the
weight while they multiply (cpu_matmul.cc). The outputs differ from XLA's dot by rounding
only (tests/pallas_kernels/test_cpu_matmul.py bounds them against a float64 product).

The kernel is compiled on first use (pallas_kernels/cpu_build.py); `available()` says
whether this machine runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_build

MAX_ROWS = 16  # float32 lanes of a 512-bit register: the rows of x one call takes
NAME = "cpu_matmul"
TARGET = f"jaxserve_{NAME}"


def cpu_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] . w [N, K]^T -> [M, N] in float32, by XLA."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] float32 (M <= MAX_ROWS) . w [N, K] float32 ^T -> [M, N] float32, by the
    kernel, registered on first use (a RuntimeError where `available()` is False); the
    shapes are checked here."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cpu_matmul: x [M, K] and w [N, K] expected, got {x.shape} and "
                         f"{w.shape}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"cpu_matmul: x has {x.shape[0]} rows; 1 to {MAX_ROWS} are taken")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"cpu_matmul: float32 operands expected, got {x.dtype} and {w.dtype}")
    cpu_build.require(NAME)
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w)


def available() -> bool:
    """Whether the kernel runs on this machine (built, loaded and registered on first ask)."""
    return cpu_build.register(NAME)
