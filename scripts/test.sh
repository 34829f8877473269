#!/usr/bin/env bash
# Set up and run the checks and the test suite. The first run downloads the demo model
# (about 93 MB) and converts it once into ~/.cache/jaxserve (JAXSERVE_CACHE_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
