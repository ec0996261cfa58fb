#!/usr/bin/env bash
# Create .venv with the CPU torch wheel, the pinned transformers (constraints.txt) and attnstore-hf (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch pinned to the CPU wheel (an open range would pull a multi-GB CUDA build)
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e '.[test,models,data]'
