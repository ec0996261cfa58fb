"""Benchmarks that print ratios measured side by side in one run: ``reuse`` (TTFT) and ``growth`` (decode cache)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from ..cache import ChunkedLayer
from ..config import StoreConfig
from ..record import session_key
from ..store import AttentionStore
from .common import timed_generate


def _write_report(rows: list[dict], cols: list[str], path: str | None, extra: dict | None = None) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(_fmt(r[c]) for c in cols) + " |\n" for r in rows)
    table = head + body
    if path:
        with open(path, "w") as f:
            json.dump({"results": rows, **(extra or {})}, f, indent=2)
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(table)
    return table


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _drop_page_cache(path) -> None:
    """Ask the kernel to forget the file's cached pages, so the next read comes from the device."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


# ---- reuse: TTFT recompute vs restored from DRAM vs restored from disk ------------------------------------------
def bench_reuse(args) -> list[dict]:
    from tqdm.auto import tqdm

    from ..data import sharegpt_text
    from ..models import load_model

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    text = sharegpt_text(12 * max(args.histories) + 2000)
    all_ids = tok(text).input_ids
    if len(all_ids) < max(args.histories) + args.new:
        raise SystemExit("not enough ShareGPT text for the requested history")
    disk_dir = tempfile.mkdtemp(prefix="attnstore-bench-")
    gen = dict(max_new_tokens=1, do_sample=False)
    rows = []
    steps = tqdm(total=len(args.histories) * args.repeats, desc="reuse bench", unit="run")
    for hist in args.histories:
        ids = torch.tensor([all_ids[: hist + args.new]])
        sid = f"bench-{hist}"
        # the conversation so far: `hist` tokens of KV in a record (DRAM and disk)
        with AttentionStore(StoreConfig(disk_dir=disk_dir)) as store:
            cache = store.cache_for(model, sid, ids[:, :hist])  # prefill keeps KV of all `hist` prompt tokens
            out, _ = timed_generate(model, ids[:, :hist], cache, **gen)
            store.save(sid, cache, out)
        rec_path = os.path.join(disk_dir, session_key("default", sid) + ".safetensors")
        warm = AttentionStore(StoreConfig(disk_dir=disk_dir))
        warm.cache_for(model, sid, ids)  # promote to DRAM
        t_re, t_dram, t_disk = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all three alike
            ref, t = timed_generate(model, ids, None, **gen)
            t_re.append(t)
            t0 = time.perf_counter()
            c = warm.cache_for(model, sid, ids)
            o, t = timed_generate(model, ids, c, t0=t0, **gen)
            assert c.source == "dram" and c.reused_tokens == hist and torch.equal(o, ref)
            t_dram.append(t)
            _drop_page_cache(rec_path)
            cold = AttentionStore(StoreConfig(disk_dir=disk_dir))
            t0 = time.perf_counter()
            c = cold.cache_for(model, sid, ids)
            o, t = timed_generate(model, ids, c, t0=t0, **gen)
            assert c.source == "disk" and c.reused_tokens == hist and torch.equal(o, ref)
            t_disk.append(t)
            cold.close()
            steps.update()
        warm.close()
        row = {"history": hist, "new": args.new, "ttft_recompute_s": statistics.median(t_re),
               "ttft_dram_s": statistics.median(t_dram), "ttft_disk_s": statistics.median(t_disk),
               "record_mb": os.path.getsize(rec_path) / 1e6}
        row["speedup_dram"] = row["ttft_recompute_s"] / row["ttft_dram_s"]
        row["speedup_disk"] = row["ttft_recompute_s"] / row["ttft_disk_s"]
        rows.append(row)
    steps.close()
    return rows


# ---- growth: the working cache vs DynamicLayer over a long reply ------------------------------------------------
def bench_growth(args) -> list[dict]:
    from transformers.cache_utils import DynamicLayer

    rows = []
    for steps in args.steps:
        k = torch.randn(1, args.heads, 1, args.head_dim)
        times = {}
        for name, make in (("dynamic", DynamicLayer), ("chunked", ChunkedLayer)):
            best = float("inf")
            for _ in range(args.repeats):
                layer = make()
                prompt = torch.randn(1, args.heads, args.prompt, args.head_dim)
                layer.update(prompt, prompt) if name == "dynamic" else layer.update(prompt, prompt, raw_keys=prompt)
                t0 = time.perf_counter()
                for _ in range(steps):
                    if name == "dynamic":
                        layer.update(k, k)
                    else:
                        layer.update(k, k, raw_keys=k)
                best = min(best, time.perf_counter() - t0)
            times[name] = best
        tok_bytes = 2 * args.heads * args.head_dim * 4
        n0 = args.prompt
        copied_dynamic = sum((n0 + i) * tok_bytes for i in range(1, steps + 1))  # whole K and V each step
        rows.append({"prompt": args.prompt, "decode_steps": steps, "dynamic_s": times["dynamic"],
                     "chunked_s": times["chunked"], "speedup": times["dynamic"] / times["chunked"],
                     "dynamic_copied_mb": copied_dynamic / 1e6})
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reuse", help="TTFT: recompute vs restored from DRAM vs from disk (Gemma 3 270M)")
    r.add_argument("--model", default=None)
    r.add_argument("--dtype", default="float32")
    r.add_argument("--histories", type=int, nargs="+", default=[512, 1024, 2048])
    r.add_argument("--new", type=int, default=64)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    g = sub.add_parser("growth", help="decode-time cache growth: chunked buffers vs DynamicLayer concatenation")
    g.add_argument("--steps", type=int, nargs="+", default=[256, 1024, 4096])
    g.add_argument("--prompt", type=int, default=2048)
    g.add_argument("--heads", type=int, default=1)
    g.add_argument("--head-dim", type=int, default=256)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    logging.basicConfig(level=logging.WARNING)
    if args.cmd == "reuse":
        rows = bench_reuse(args)
        cols = ["history", "new", "ttft_recompute_s", "ttft_dram_s", "ttft_disk_s", "speedup_dram", "speedup_disk",
                "record_mb"]
    else:
        rows = bench_growth(args)
        cols = ["prompt", "decode_steps", "dynamic_s", "chunked_s", "speedup", "dynamic_copied_mb"]
    print(_write_report(rows, cols, args.json, {"benchmark": args.cmd, "torch_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
