"""Building and loading the CPU kernels (pallas_kernels/cpu_*.cc), C++ behind jax.ffi.

A kernel's source, with the headers beside it (cpu_pool.h), is compiled on first use with
the machine's C++ compiler (`$CXX`, else `c++`) against jaxlib's XLA FFI headers, into
`$JAXSERVE_CACHE_DIR/kernels` (default `~/.cache/jaxserve/kernels`), keyed by a hash of the
sources, the flags and jaxlib's version, and loaded from there after; its handler is
registered with XLA as an FFI target of the same name. `register(name)` says whether this
machine runs it (x86 with AVX-512F, a compiler, a successful build); where it cannot, the
reason is printed once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

FLAGS = ("-O3", "-mavx512f", "-mfma", "-std=c++17", "-shared", "-fPIC")
HERE = Path(__file__).parent


@functools.cache
def register(name: str) -> bool:
    """Build and load `<name>.cc` and register its handler `jaxserve_<name>` for the CPU;
    False (with the reason printed) where that cannot be done here."""
    problem = unsupported()
    library = None
    if problem is None:
        try:
            library = ctypes.CDLL(str(build(name)))
        except (OSError, subprocess.CalledProcessError) as e:
            problem = f"its build failed: {_message(e)}"
    if problem is not None:
        print(f"jaxserve: the CPU kernel {name} is off: {problem}; XLA's ops run instead",
              file=sys.stderr, flush=True)
        return False
    target = f"jaxserve_{name}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                platform="cpu")
    _loaded.append(library)  # kept loaded while XLA may call into it
    return True


_loaded: list[ctypes.CDLL] = []


def require(name: str) -> None:
    """register(name), or a RuntimeError where the kernel cannot run here: a kernel's
    wrapper calls it before its ffi_call, so the handler is registered whoever calls first."""
    if not register(name):
        raise RuntimeError(f"the CPU kernel {name} cannot run on this machine (the reason is "
                           "printed above)")


def unsupported() -> str | None:
    """Why this machine cannot run the kernels, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU (this is {platform.machine()})"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "/proc/cpuinfo cannot be read to check for AVX-512"
    if " avx512f" not in flags:
        return "this CPU has no AVX-512F"
    return None


def unbuildable() -> str | None:
    """Why the kernels cannot be built here (unsupported, or no C++ compiler), or None: then
    a failed build is a fault, not this machine's lack."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler ({compiler()})"
    return unsupported()


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def build(name: str) -> Path:
    """`<name>.cc`'s shared library, compiled into the cache directory if it is not there."""
    compiler_path = compiler()
    source_path = HERE / f"{name}.cc"
    # the kernel's source and the headers beside it (cpu_pool.h) make the key
    source = b"".join(p.read_bytes() for p in (source_path, *sorted(HERE.glob("*.h"))))
    key = hashlib.sha256(source + " ".join((compiler_path, *FLAGS,
                                            jaxlib.__version__)).encode())
    cache = Path(os.path.expanduser(os.environ.get("JAXSERVE_CACHE_DIR", "~/.cache/jaxserve")))
    directory = cache / "kernels"
    library = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once each write their
    # own file, and the rename makes one of them the library, whole.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run([compiler_path, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HERE}",
                        str(source_path), "-o", partial], check=True, capture_output=True,
                       text=True)
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
