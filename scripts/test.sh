#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (slow real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -ra "$@"
