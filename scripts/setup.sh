#!/usr/bin/env bash
# Create .venv with the CPU torch wheel, the pinned transformers (constraints.txt) and attnstore-hf (editable).
# Skipped when .venv was set up from the same requirements (a stamp of them) and still has every pinned version
# and this checkout's package installed; ATTNSTORE_HF_SETUP=force redoes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.attnstore-hf-setup
want=$(cat constraints.txt setup.cfg pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
# (-I: the checkout itself is not on the path, so only what .venv has installed counts)
probe='import importlib.metadata as md, importlib.util as u, pathlib, sys
pins = [l.split("#")[0].strip().split("==") for l in open("constraints.txt")]
bad = [n for n, *v in (p for p in pins if p[0]) if v and md.version(n).split("+")[0] != v[0]]
spec = u.find_spec("attnstore_hf")
here = spec is not None and pathlib.Path(spec.origin).resolve().parent == pathlib.Path("attnstore_hf").resolve()
sys.exit(1 if bad or not here else 0)'
if [ "${ATTNSTORE_HF_SETUP:-}" != force ] && [ -x .venv/bin/python ] && [ -f "$stamp" ] \
    && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -I -c "$probe" 2>/dev/null; then
  exit 0
fi
rm -f "$stamp"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch pinned to the CPU wheel (an open range would pull a multi-GB CUDA build)
python -m pip install -q torch==2.13.0
python -m pip install -q -c constraints.txt -e '.[test,models,data]'
echo "$want" > "$stamp"
