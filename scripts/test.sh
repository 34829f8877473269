#!/usr/bin/env bash
# Set up and run the checks and the test suite. The first run downloads the demo model
# (about 93 MB) and converts it once into ~/.cache/jaxserve (JAXSERVE_CACHE_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two pytest workers, each test file whole on one of them (module fixtures built once): on a
# 2-core machine the suite takes 0.77x its time in one process (docs/performance.md, "The
# test suite in two processes"). JAXSERVE_TEST_WORKERS=0 runs it in one.
exec .venv/bin/python -m pytest -q -n "${JAXSERVE_TEST_WORKERS:-2}" --dist loadfile "$@"
