"""Host time of restoring a record when the tensors are tiny, so that per-layer Python and op dispatch is all
there is (what a launch-bound GPU restore waits on before the forward can start). A GPU adds its own per-operation
cost on top (launches, copies issued, events): on an H100 host this proxy read 2.8 ms where the layered CUDA
`cache_for` at 1,024 tokens spent 5.3 ms.

    python scripts/restore_host_cost.py          # median ms of cache_for(), layer-wise restore off
    python scripts/restore_host_cost.py --both   # also with layers restored in groups, as on an accelerator
    python scripts/restore_host_cost.py --tokens 8   # a smaller record (less copying, more pure host work)
    python scripts/restore_host_cost.py --both --paced   # also in groups sized by an H100's pace at 1,024 tokens

On a CPU, glibc hands a block above its mmap threshold (a group's buffers) back to the kernel when freed, so every
restore would fault fresh pages in (measured: ~100 us per copy into a new 30 MB block, most of the "host" time);
the script raises the threshold first, so freed blocks are reused as a GPU's caching allocator reuses them and
what is left is the host work of issuing the restore.

A random-weight model with Llama-3-8B's 32 layers and GQA (``llama3-8b-host`` of ``bench.py overlap``), a
64-token record (``--tokens``) in DRAM, one torch thread. The variants run interleaved (one call of each in
turn), so drift on a shared machine hits them alike. Run it on two commits to compare them.
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

def _keep_freed_blocks() -> None:
    """Large freed blocks stay with the process (``mallopt``), as a caching allocator keeps them (glibc only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: no mmap for blocks under 1 GiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: no trimming of the heap's top either
    except OSError:
        pass


#: the pace of a layered turn on an H100 at 1,024 tokens of Llama-3-8B history (load 5.4 ms, the new tokens'
#: forward 29.7 ms, the restore's host work 5.3 ms): (forward / load, host / load)
H100_PACE = (29.7 / 5.4, 5.3 / 5.4)


def main() -> None:
    _keep_freed_blocks()
    argv = sys.argv[1:]
    tokens = int(argv[argv.index("--tokens") + 1]) if "--tokens" in argv else 64
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model, _ = load_bench_model("llama3-8b-host", "cpu", torch.float32)
    ids = torch.randint(8, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    store = AttentionStore(StoreConfig(disk_dir=None, layerwise=False, async_save=False, restore_mode="load"))
    with torch.no_grad():
        cache = store.cache_for(model, "s", ids)
        model(ids, past_key_values=cache, use_cache=True)
    store.save("s", cache, ids)
    turn = torch.cat([ids, ids[:, :4]], 1)
    variants = {"layer by layer": (("cuda",), None)}
    if "--both" in argv:
        variants["in groups (accelerator path)"] = (("cuda", "cpu"), None)
    if "--paced" in argv:
        variants["in groups sized by an H100's pace"] = (("cuda", "cpu"), H100_PACE)
    choose = store.cost.choose
    pace = {"now": None}

    def choose_paced(*a, **k):  # the pace this machine measures is a CPU's: use the H100's for that variant
        plan = choose(*a, **k)
        plan.pop("pace", None)
        if pace["now"] is not None:
            plan["pace"] = pace["now"]
        return plan

    store.cost.choose = choose_paced
    times = {name: [] for name in variants}
    phases = {name: {} for name in variants}
    try:
        for _ in range(300):
            for name, (devices, pace["now"]) in variants.items():
                cache_mod.GROUP_DEVICES = devices
                t0 = time.perf_counter()
                c = store.cache_for(model, "s", turn)
                times[name].append(time.perf_counter() - t0)
                assert c.reused_tokens == tokens
                for k, v in c.host_ms.items():
                    phases[name].setdefault(k, []).append(v)
    finally:
        cache_mod.GROUP_DEVICES = ("cuda",)
    for name in variants:
        med = statistics.median(times[name])
        print(f"cache_for restoring {tokens} tokens into 32 layers, {name}: median "
              f"{med * 1e3:.2f} ms ({med / 32 * 1e6:.0f} us a layer); phases (ms): "
              + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases[name].items()))


if __name__ == "__main__":
    main()
