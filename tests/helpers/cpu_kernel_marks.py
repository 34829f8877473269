"""The mark of the CPU kernels' tests (pallas_kernels/cpu_*.cc)."""

import jax
import pytest

from pallas_kernels import cpu_build

# Skipped only where the kernels cannot be built; a failed build on a machine that has what
# they need fails each file's test_it_is_built_and_registered.
needs_cpu_kernels = pytest.mark.skipif(
    jax.default_backend() != "cpu" or cpu_build.unbuildable() is not None,
    reason="needs a CPU with AVX-512 and a C++ compiler")
