#!/usr/bin/env bash
# Create .venv with Python 3.12 (jax 0.11 needs it) and install jaxserve with its test tools.
# Idempotent: a second run only checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidates=(python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
  fi
  candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12 python3)
  for c in "${candidates[@]}"; do
    if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      command -v "$c" || echo "$c"
      return 0
    fi
  done
  echo "jaxserve needs Python 3.12 (jax 0.11); none found" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "creating .venv with $py" >&2
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# The package is installed editable: code changes need no reinstall, only a changed
# pyproject.toml (dependencies, entry points) does.
stamp=.venv/.jaxserve-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing jaxserve and its dependencies into .venv" >&2
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi
