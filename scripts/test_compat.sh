#!/usr/bin/env bash
# The fast tests again on the oldest supported transformers (5.17, the GPU machine's), or on the version in
# $TRANSFORMERS; arguments go to pytest (e.g. a subset of the test files).
# transformers (and the huggingface_hub it wants) is swapped inside .venv for the run and put back after it:
# a second environment would hold a second copy of torch, and CI machines have been seen to run out of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -f .venv/.attnstore-hf-setup  # .venv differs from its requirements until restore() has run: setup.sh redoes it
restore() { python -m pip install -q --no-cache-dir -c constraints.txt -e '.[test,models,data]'; }
trap restore EXIT
python -m pip install -q --no-cache-dir "transformers==${TRANSFORMERS:-5.17.0}"
python -c "import transformers; print('transformers', transformers.__version__)"
python -m pytest -q -ra -m "not slow" -p no:cacheprovider "$@"
