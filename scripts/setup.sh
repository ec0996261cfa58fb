#!/usr/bin/env bash
# Create .venv with the CPU torch wheel, the pinned transformers (constraints.txt) and attnstore-hf (editable).
# Skipped when .venv was set up from the same requirements (a stamp of them); ATTNSTORE_HF_SETUP=force redoes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.attnstore-hf-setup
want=$(cat constraints.txt setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "${ATTNSTORE_HF_SETUP:-}" != force ] && [ -x .venv/bin/python ] && [ -f "$stamp" ] \
    && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("attnstore_hf", "torch", "transformers")))' 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch pinned to the CPU wheel (an open range would pull a multi-GB CUDA build)
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e '.[test,models,data]'
echo "$want" > "$stamp"
