"""Host time of restoring a record when the tensors are tiny, so that per-layer Python and op dispatch is all
there is (what a launch-bound GPU restore waits on before the forward can start).

    python scripts/restore_host_cost.py          # median ms of cache_for(), layer-wise restore off
    python scripts/restore_host_cost.py --both   # also with layers restored in groups, as on an accelerator

A random-weight model with Llama-3-8B's 32 layers and GQA (``llama3-8b-host`` of ``bench.py overlap``), a
64-token record in DRAM, one torch thread. Run it on two commits to compare them.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import attnstore_hf.cache as cache_mod
from attnstore_hf import AttentionStore, StoreConfig
from attnstore_hf.cli.overlap import load_bench_model


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, _ = load_bench_model("llama3-8b-host", "cpu", torch.float32)
    ids = torch.randint(8, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    store = AttentionStore(StoreConfig(disk_dir=None, layerwise=False, async_save=False, restore_mode="load"))
    with torch.no_grad():
        cache = store.cache_for(model, "s", ids)
        model(ids, past_key_values=cache, use_cache=True)
    store.save("s", cache, ids)
    turn = torch.cat([ids, ids[:, :4]], 1)
    grouped = ("--both" in sys.argv[1:]) and [False, True] or [False]
    for group in grouped:
        cache_mod.GROUP_DEVICES = ("cuda", "cpu") if group else ("cuda",)
        times, phases = [], {}
        for _ in range(300):
            t0 = time.perf_counter()
            c = store.cache_for(model, "s", turn)
            times.append(time.perf_counter() - t0)
            for k, v in c.host_ms.items():
                phases.setdefault(k, []).append(v)
        assert c.reused_tokens == 64
        med = statistics.median(times)
        how = "in groups (accelerator path)" if group else "layer by layer"
        print(f"cache_for restoring 64 tokens into 32 layers, {how}: median {med * 1e3:.2f} ms "
              f"({med / 32 * 1e6:.0f} us a layer); phases (ms): "
              + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases.items()))

if __name__ == "__main__":
    main()
