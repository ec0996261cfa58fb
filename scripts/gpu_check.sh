#!/usr/bin/env bash
# The CUDA checks of the layer-wise pipeline, run on a GPU machine (torch + transformers preinstalled, no network):
# the gpu-marked tests, then `bench.py overlap --device cuda` for random-weight Llama-3-8B and Llama-2-7B shapes
# (full / load / new / sync / layered / both / staged columns).
# Results go to ${OUT:-gpu-results}/.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# attnstore_hf.patches lives in patches/ (package_dir): a link makes the source tree importable without pip
[ -e attnstore_hf/patches ] || ln -s ../patches attnstore_hf/patches
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_pipeline.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
python3 -m pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_staging.py 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.txt"
python3 scripts/restore_host_cost.py 2>&1 | tee "$OUT/restore_host_cost.txt"  # host side of a restore (CPU)
for m in llama3-8b llama2-7b; do
  python3 scripts/bench.py overlap --device cuda --model "$m" --repeats "${REPEATS:-5}" --json "$OUT/overlap_$m.json" 2>&1 \
    | grep -v "overlap bench:" | tee "$OUT/overlap_$m.txt"
done
python3 scripts/bench.py overlap --device cuda --model llama3-8b --tier disk --histories 8192 --repeats 3 \
  --decode-tokens 8 --json "$OUT/overlap_disk.json" 2>&1 | grep -v "overlap bench:" | tee "$OUT/overlap_disk.txt"
rm -f attnstore_hf/patches
