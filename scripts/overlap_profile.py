"""Where the time of a restored turn goes when the forward is launch-bound (a GPU at ~100 new tokens).

    python scripts/overlap_profile.py --device cuda --model llama3-8b [--out DIR]

For each history length and each variant, the median of: host time of ``cache_for`` (no synchronisation), host time
to issue the forward, and wall time until the device is idle. Variants: ``new`` (a resident cache: the
forward alone), ``dynamic`` (the same forward on transformers' own ``DynamicCache``: what our cache and hooks
add), ``sync`` (load, wait, forward), ``layered`` (our pipeline), ``fixed`` (the same with the fixed restore groups,
not sized by the turn's pace: ``cache.GROUP_PACING`` off), ``threaded`` (the same, the restore issued from the
loader thread: ``StoreConfig.restore_thread``), ``staged`` (restored before the turn). With
``--out``, a ``torch.profiler`` table of one layered turn (self CPU time) is written there too. Then the host time
of ``cache_for``'s phases (``AttentionStoreCache.host_ms``): prepare, find the record, match the ids, restore
(of which: ``restore_setup`` sizing the cache and planning the jobs, ``restore_issue`` running or enqueuing them,
``restore_jobs`` the jobs alone), finish.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings

import torch

import attnstore_hf.cache as cache_mod
from attnstore_hf import AttentionStore, StoreConfig
from attnstore_hf.cli.overlap import _ids, load_bench_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--histories", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--new", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="folder for the profiler tables (profile_MODEL.txt)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model, tok = load_bench_model(args.model, args.device, dtype)
    vocab = model.config.vocab_size

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def forward(x, cache):
        return model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    from transformers import DynamicCache

    for hist in args.histories:
        ids = _ids(tok, hist + args.new, vocab, args.device)
        scratch = tempfile.mkdtemp(prefix="attnstore-profile-")
        store = AttentionStore(StoreConfig(disk_dir=scratch, dram_bytes="64GB", disk_bytes=None,
                                           restore_mode="load", write_policy="write_back"))
        with torch.no_grad():
            c = store.cache_for(model, "s", ids[:, :hist])
            forward(ids[:, :hist], c)
            store.save("s", c, ids[:, :hist]).result()
        del c
        rows = {k: [] for k in ("new", "dynamic", "sync", "layered", "fixed", "threaded", "staged")}
        phases: dict = {}  # variant -> phase of cache_for -> host ms (AttentionStoreCache.host_ms)

        def turn(name):
            with torch.no_grad():
                if name in ("new", "dynamic"):
                    if name == "new":
                        store.config.layerwise, store.config.restore_thread = False, False
                        cache = store.cache_for(model, "s", ids)
                    else:
                        cache = DynamicCache(config=model.config)
                        forward(ids[:, :hist], cache)
                    sync()
                    t0 = time.perf_counter()
                    t1 = t0
                elif name == "staged":
                    store.config.layerwise, store.config.restore_thread = True, False
                    cache = store.stage(model, "s", ids)
                    cache.wait_loaded()
                    sync()
                    t0 = time.perf_counter()
                    assert store.cache_for(model, "s", ids) is cache
                    t1 = time.perf_counter()
                else:
                    store.config.layerwise = name in ("layered", "fixed", "threaded")
                    store.config.restore_thread = name == "threaded"
                    cache_mod.GROUP_PACING = name != "fixed"
                    sync()
                    t0 = time.perf_counter()
                    cache = store.cache_for(model, "s", ids)
                    t1 = time.perf_counter()
                forward(ids[:, hist:], cache)
                t2 = time.perf_counter()
                sync()
                t3 = time.perf_counter()
            cache_mod.GROUP_PACING = True
            if name not in ("new", "dynamic", "staged"):
                for k, v in cache.host_ms.items():
                    phases.setdefault(name, {}).setdefault(k, []).append(v)
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t0) * 1e3

        for name in rows:  # warm-up
            turn(name)
        for _ in range(args.repeats):
            for name in rows:
                rows[name].append(turn(name))
        print(f"\nhistory {hist}, {args.new} new tokens, {args.model} {str(dtype)[6:]} on {args.device} "
              f"(median of {args.repeats}, ms)")
        print(f"{'variant':<9} {'lookup host':>12} {'forward host':>13} {'to idle':>9}")
        for name, vals in rows.items():
            med = [statistics.median(v[i] for v in vals) for i in range(3)]
            print(f"{name:<9} {med[0]:>12.2f} {med[1]:>13.2f} {med[2]:>9.2f}")
        print("host ms of cache_for's phases (medians): " + "; ".join(
            f"{name}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in ph.items())
            for name, ph in phases.items()))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=acts) as prof:
                turn("layered")
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            with torch.profiler.profile(activities=acts) as prof:
                turn("new")
            with open(os.path.join(args.out, f"profile_{args.model}.txt"), "a") as f:
                f.write(f"\n== layered, history {hist}\n{table}\n== new, history {hist}\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        store.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
