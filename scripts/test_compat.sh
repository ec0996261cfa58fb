#!/usr/bin/env bash
# The oldest supported transformers (5.17, the GPU machine's) in its own .venv-5.17: the fast tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-5.17/bin/python ] || "$PY" -m venv .venv-5.17
. .venv-5.17/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
python -m pip install -q 'transformers==5.17.0' -e '.[test,models,data]'
python -c "import transformers; print('transformers', transformers.__version__)"
python -m pytest -q -ra -m "not slow" -p no:cacheprovider
