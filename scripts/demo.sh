#!/usr/bin/env bash
# The main job: set up .venv if needed, then chat with the bundled Gemma 3 270M (scripted demo by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ $# -eq 0 ]; then set -- --demo; fi
python scripts/chat.py "$@"
