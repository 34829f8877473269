#!/usr/bin/env bash
# Set up and serve the embedded demo model (SmolLM2-135M-Instruct) on 127.0.0.1:50051.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jaxserve serve --config configs/smollm2-135m-cpu.yaml "$@"
