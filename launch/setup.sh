#!/usr/bin/env bash
# Creates .venv with a Python 3.12 interpreter and installs the pinned requirements.
#
#   bash launch/setup.sh            # idempotent: reuses .venv when it already has jax
#
# jax >= 0.11 needs Python 3.12; on 3.11 pip silently installs jax 0.10.2 instead, so this
# script refuses any other version. It looks for `python3.12` on PATH, then pyenv's 3.12.x.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidate
  for candidate in "${PYTHON:-}" python3.12 \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 \
      /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate" 2>/dev/null || echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ -x .venv/bin/python ] && .venv/bin/python -c 'import jax, flax, grain' 2>/dev/null; then
  echo "setup: .venv is ready ($(.venv/bin/python --version))"
  exit 0
fi
if ! python=$(find_python312); then
  echo "setup: no Python 3.12 found. Install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
  exit 1
fi
echo "setup: creating .venv with $python ($("$python" --version))"
"$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -c 'import jax; print("setup: jax", jax.__version__, "devices", jax.devices())'
