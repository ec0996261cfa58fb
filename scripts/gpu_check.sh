#!/usr/bin/env bash
# The CUDA checks of the layer-wise pipeline, run on a GPU machine (torch + transformers preinstalled, no network):
# the gpu-marked tests, where a restored turn's time goes (scripts/overlap_profile.py), `bench.py overlap --device
# cuda` for a random-weight Llama-3-8B shape (full / load / new / sync / layered / both / tail / staged columns; THREAD=1:
# also with the restore issued from the loader thread), then the Llama-2-7B shape and the disk tier (PART=1 stops
# before those). Each step has its own time limit. Results go to ${OUT:-gpu-results}/: log.txt, overlap_*.json
# (+ .md), profile_llama3-8b.txt — 8 files, what the device tool brings back at most.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
REPEATS=${REPEATS:-5}
DECODE=${DECODE_TOKENS:-32}
# attnstore_hf.patches lives in patches/ (package_dir): a link makes the source tree importable without pip
[ -e attnstore_hf/patches ] || ln -s ../patches attnstore_hf/patches
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { local limit=$1; shift; echo "== $(date +%T) $*"; timeout "$limit" "$@" 2>&1 | grep -v "overlap bench:"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 90 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/
step 110 python3 scripts/overlap_profile.py --device cuda --model llama3-8b --histories 1024 2048 8192 \
  --repeats "$((REPEATS + 4))" --out "$OUT"
# --fixed-groups: the layered turn also with the fixed restore groups (1, 1, 2, 4, 4, ...) instead of groups sized
# by the turn's pace (cache.GROUP_PACING, new on 2026-11-27 and not measured on a GPU yet), interleaved
step 170 python3 scripts/bench.py overlap --device cuda --model llama3-8b --repeats "$REPEATS" --decode-tokens "$DECODE" \
  --fixed-groups --json "$OUT/overlap_llama3-8b.json"
if [ "${THREAD:-0}" = 1 ]; then  # the restore issued from the loader thread (measured slower on 2026-11-27)
  step 80 python3 scripts/bench.py overlap --device cuda --model llama3-8b --repeats "$REPEATS" --histories 1024 2048 \
    --decode-tokens 8 --restore-thread --json "$OUT/overlap_llama3-8b_thread.json"
fi
if [ "${PART:-all}" != 1 ]; then
  step 100 python3 scripts/bench.py overlap --device cuda --model llama2-7b --repeats "$REPEATS" \
    --decode-tokens "$DECODE" --json "$OUT/overlap_llama2-7b.json"
  step 60 python3 scripts/bench.py overlap --device cuda --model llama3-8b --tier disk --histories 8192 --repeats 3 \
    --decode-tokens 8 --json "$OUT/overlap_disk.json"
  step 30 python3 scripts/restore_host_cost.py --both --paced  # the host side of a restore, on this machine's CPU
fi
echo "== $(date +%T) done"
rm -f attnstore_hf/patches
