"""y [M, N] = x [M, K] . w [N, K]^T in float32 for up to 16 rows of x, on a CPU with AVX-512:
a C++ kernel (cpu_matmul.cc) behind jax.ffi, for the matmuls of decode batches.

XLA's CPU GEMM runs the demo's decode matmuls of 4-16 rows at 100-130 GFLOP/s on 2 cores,
where the weight's bytes alone would allow more than twice that. The kernel holds the 16
rows' values of one input in one register, broadcasts each weight value into it, and
prefetches the weight's next rows while it multiplies these (cpu_matmul.cc). Each output is
one float32 sum over the inputs in order, so it differs from XLA's dot by rounding only
(tests/kernels/test_cpu_matmul.py bounds it against a float64 product).

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`)
against jaxlib's XLA FFI headers, into `$JAXSERVE_CACHE_DIR/kernels` (default
`~/.cache/jaxserve/kernels`), keyed by a hash of the source, the flags and jaxlib's version,
and loaded from there after. `available()` says whether this machine can run it (x86 with
AVX-512F, a compiler, a successful build); where it cannot, the reason is printed once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

MAX_ROWS = 16  # float32 lanes of a 512-bit register: the rows of x one call takes
TARGET = "jaxserve_cpu_matmul"
SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-mavx512f", "-mfma", "-std=c++17", "-shared", "-fPIC")


def cpu_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] . w [N, K]^T -> [M, N] in float32, by XLA."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] float32 (M <= MAX_ROWS) . w [N, K] float32 ^T -> [M, N] float32, by the
    kernel. Call only where `available()`; the shapes are checked here."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"cpu_matmul: x [M, K] and w [N, K] expected, got {x.shape} and "
                         f"{w.shape}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"cpu_matmul: x has {x.shape[0]} rows; 1 to {MAX_ROWS} are taken")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"cpu_matmul: float32 operands expected, got {x.dtype} and {w.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w)


def available() -> bool:
    """Whether the kernel runs on this machine (built, loaded and registered on first ask)."""
    return _load() is not None


@functools.cache
def _load() -> ctypes.CDLL | None:
    problem = _unsupported()
    library = None
    if problem is None:
        try:
            library = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.CalledProcessError) as e:
            problem = f"its build failed: {_message(e)}"
    if problem is not None:
        print(f"jaxserve: the CPU matmul kernel is off: {problem}; XLA's dot runs instead",
              file=sys.stderr, flush=True)
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, TARGET)),
                                platform="cpu")
    return library


def _unsupported() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU (this is {platform.machine()})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "/proc/cpuinfo cannot be read to check for AVX-512"
    if " avx512f" not in flags:
        return "this CPU has no AVX-512F"
    return None


def _build() -> Path:
    """The kernel's shared library, compiled into the cache directory if it is not there."""
    compiler = os.environ.get("CXX", "c++")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, jaxlib.__version__)).encode())
    cache = Path(os.path.expanduser(os.environ.get("JAXSERVE_CACHE_DIR", "~/.cache/jaxserve")))
    directory = cache / "kernels"
    library = directory / f"cpu_matmul-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once each write their
    # own file, and the rename makes one of them the library, whole.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o",
                        partial], check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _message(error: Exception) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        lines = (error.stderr or "").strip().splitlines()
        return lines[-1] if lines else f"{error.cmd[0]} exited {error.returncode}"
    return str(error)
