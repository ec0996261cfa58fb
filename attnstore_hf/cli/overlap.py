"""``bench.py overlap``: does the layer-wise pipeline hide loading behind compute? full / load / new / sync / layered /
both / tail (the last tokens recomputed with the new ones) / staged (restore started before the turn with
``store.stage``) / auto (what the cost model picks)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import torch

from .. import cache as cache_mod
from ..config import StoreConfig
from ..store import AttentionStore
from .common import DTYPES, positive_int, size, writable_parent

#: random-weight shapes for GPU timing (weights do not change the time of a forward)
SHAPES = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=16384,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama-3-8B's layer count and GQA with tiny tensors: the host work per layer (Python, op dispatch) dominates,
    # as it does for a launch-bound GPU forward; shows on a CPU whether restore overhead serialises with compute
    "llama3-8b-host": dict(hidden_size=512, intermediate_size=512, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=1000, max_position_embeddings=16384,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=16384,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=16384,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
}


def load_bench_model(name: str | None, device: str, dtype: torch.dtype):
    """The bundled Gemma 3 270M (``None``), a local model dir, or a random-weight shape from :data:`SHAPES`."""
    if name in SHAPES:
        import transformers as tf

        cfg = tf.LlamaConfig(**SHAPES[name], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model in fp32 would not fit a CPU host
        try:
            with torch.device(device):
                model = tf.LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(default)
        return model, None
    from ..models import load_model

    model, tok = load_model(name, dtype=dtype)
    return model.to(device), tok


def _ids(tok, n: int, vocab: int, device) -> torch.Tensor:
    if tok is None:
        g = torch.Generator().manual_seed(n)
        return torch.randint(8, vocab, (1, n), generator=g).to(device)
    from ..data import sharegpt_text

    ids = tok(sharegpt_text(6 * n + 2000)).input_ids
    if len(ids) < n:
        raise SystemExit(f"not enough ShareGPT text for {n} tokens")
    return torch.tensor([ids[:n]], device=device)


class _Clock:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def bench_overlap(args) -> tuple[list[dict], dict]:
    disk_dir = tempfile.mkdtemp(prefix="attnstore-overlap-")
    try:
        return _bench_overlap(args, disk_dir)
    finally:  # the records written (up to GBs for the 8B shapes) do not outlive the bench
        shutil.rmtree(disk_dir, ignore_errors=True)


def _bench_overlap(args, disk_dir: str) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    model, tok = load_bench_model(args.model, device, dtype)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    histories = args.histories or ([1024, 2048, 4096, 8192] if device == "cuda" else [1024, 2048, 4096])
    dram = args.dram
    clock = _Clock(device)
    rows = []
    bar = tqdm(total=len(histories) * args.repeats, desc="overlap bench", unit="run")

    def forward(ids, cache):
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    def store_for(**kw):
        return AttentionStore(StoreConfig(disk_dir=disk_dir, dram_bytes=dram, disk_bytes=None,
                                          restore_mode=kw.pop("restore_mode", "load"),
                                          restore_thread=args.restore_thread, **kw))

    for hist in histories:
        ids = _ids(tok, hist + args.new, vocab, device)
        sid = f"h{hist}"
        # the conversation so far: `hist` tokens of KV in a record, in DRAM (pinned on CUDA) and, for --tier disk,
        # on disk (written at close)
        warm = store_for(write_policy="write_back")
        cache = warm.cache_for(model, sid, ids[:, :hist])
        forward(ids[:, :hist], cache)
        warm.save(sid, cache, ids[:, :hist]).result()
        del cache
        if args.tier == "disk":
            warm.close()
        for _ in range(2):  # warm-up (allocator, kernels), not timed
            s = warm if args.tier == "dram" else store_for()
            c = s.cache_for(model, sid, ids)
            forward(ids[:, c.reused_tokens:], c)
            forward(ids, None)
            if s is not warm:
                s.close()
        t = {k: [] for k in ("full", "load", "new", "sync", "layered", "both", "tail", "staged", "auto")}
        alt = bool(args.group_layers or args.fixed_groups)
        if alt:
            t["layered_alt"] = []
        choices = []  # what restore_mode="auto" picked, per repeat
        splits = []  # tokens restore_mode="tail" recomputed with the new ones, per repeat

        def store_with(layerwise=True, restore_mode="load"):
            if args.tier == "dram":  # the warm store holds the record in DRAM: switch its options
                warm.config.layerwise, warm.config.restore_mode = layerwise, restore_mode
                return warm
            return store_for(layerwise=layerwise, restore_mode=restore_mode)  # a new store: the record is on disk

        worst = 0.0  # largest logit difference of a restored turn from the recompute's, over every variant

        def check(got, ref):
            nonlocal worst
            worst = max(worst, (got.float() - ref.float()).abs().max().item())

        for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every variant alike
            with clock as c:
                ref = forward(ids, None)
            t["full"].append(c.seconds)
            variants = [("sync", {"layerwise": False}), ("layered", {"layerwise": True}),
                        ("both", {"restore_mode": "both"}), ("tail", {"restore_mode": "tail"}),
                        ("auto", {"restore_mode": "auto"})]
            if alt:  # the same layered turn with other restore groups, interleaved with the rest
                variants.insert(2, ("layered_alt", {"layerwise": True}))
            for name, kw in variants:
                store = store_with(**kw)
                group_layers, pacing = cache_mod.GROUP_LAYERS, cache_mod.GROUP_PACING
                if name == "layered_alt":
                    cache_mod.GROUP_LAYERS = args.group_layers or group_layers
                    cache_mod.GROUP_PACING = pacing and not args.fixed_groups
                try:
                    with clock as c:
                        cache = store.cache_for(model, sid, ids)
                        got = forward(ids[:, cache.reused_tokens:], cache)
                finally:
                    cache_mod.GROUP_LAYERS, cache_mod.GROUP_PACING = group_layers, pacing
                check(got, ref)
                if name == "auto":  # the cost model's pick, from what the store measured so far
                    choices.append(cache.restore_plan["choice"])
                elif name == "tail":  # the last tokens recomputed with the new ones
                    splits.append(cache.restore_plan["split"])
                    assert cache.reused_tokens == hist - splits[-1], (name, cache.reused_tokens)
                else:
                    assert cache.reused_tokens == hist, (name, cache.reused_tokens)
                t[name].append(c.seconds)
                if store is not warm:
                    store.close()
            store = store_with(layerwise=True)
            early = store.stage(model, sid, ids)  # restored while "the previous turn" runs, finished before the turn
            early.wait_loaded()
            with clock as c:
                cache = store.cache_for(model, sid, ids)
                got = forward(ids[:, cache.reused_tokens:], cache)
            check(got, ref)
            assert cache is early and cache.reused_tokens == hist
            t["staged"].append(c.seconds)
            if store is not warm:
                store.close()
            store = store_with(layerwise=False)
            with clock as c:  # loading alone
                cache = store.cache_for(model, sid, ids)
            t["load"].append(c.seconds)
            with clock as c:  # the new tokens on a resident cache
                got = forward(ids[:, hist:], cache)
            check(got, ref)
            t["new"].append(c.seconds)
            if store is not warm:
                store.close()
            bar.update()
        if dtype == torch.float32 and worst > 1e-4:  # (bf16: `both` and `tail` round differently; reported)
            raise RuntimeError(f"a restored turn's logits differ from the recompute's by {worst:.2e} at history "
                               f"{hist}: not exact")
        row = {"history": hist, "new_tokens": args.new, "tier": args.tier, "max_logit_diff": worst}
        for k, v in t.items():
            row[k] = statistics.median(v) * 1e3
        row["auto_choice"] = max(set(choices), key=choices.count)
        row["tail_split"] = int(statistics.median(splits))
        row["auto_vs_full"] = row["auto"] / row["full"]
        row["layered_vs_max"] = row["layered"] / max(row["load"], row["new"])
        if alt:
            row["group_layers_alt"] = (f"{args.group_layers or cache_mod.GROUP_LAYERS} "
                                       f"{'fixed' if args.fixed_groups else 'paced'}")
            row["layered_alt_vs_max"] = row["layered_alt"] / max(row["load"], row["new"])
        row["staged_vs_new"] = row["staged"] / row["new"]
        row["sync_vs_layered"] = row["sync"] / row["layered"]
        row["full_vs_layered"] = row["full"] / row["layered"]
        rows.append(row)
        warm.close()
        clock.sync()
    bar.close()
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": args.model or "gemma3-270m",
            "dtype": str(dtype).replace("torch.", ""), "tier": args.tier, "units": "ms",
            "restore_thread": args.restore_thread, "group_layers": cache_mod.GROUP_LAYERS,
            "group_pacing": cache_mod.GROUP_PACING, "group_layers_alt": args.group_layers,
            "fixed_groups_alt": args.fixed_groups}
    info["decode"] = _decode_with_and_without_saving(model, tok, vocab, device, args, disk_dir)
    return rows, info


def _decode_with_and_without_saving(model, tok, vocab, device, args, disk_dir) -> dict:
    """Decode tokens/s of a serving loop: ``--decode-turns`` turns generated back to back, each on a restored
    cache, with every turn saved asynchronously (its device-to-host copies and commit overlap the next turn's
    decoding; the block's time ends once the last save is committed) vs the same turns not saved. Blocks
    alternate off / on; the first pair warms up."""
    hist, turns = args.decode_history, args.decode_turns
    ids = _ids(tok, hist, vocab, device)
    clock = _Clock(device)
    on, off = [], []
    cfg = StoreConfig(disk_dir=disk_dir, dram_bytes=args.dram, disk_bytes=None, restore_mode="load",
                      write_policy="write_back")  # records stay in DRAM: no disk write in the measurement
    with AttentionStore(cfg) as store:
        seed = store.cache_for(model, "decode", ids)
        model(ids, past_key_values=seed, use_cache=True, logits_to_keep=1)
        store.save("decode", seed, ids).result()
        del seed
        gen = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False,
                   attention_mask=torch.ones_like(ids))
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * (args.repeats + 1), desc="decode, saving off / on", unit="block")
        for r in range(args.repeats + 1):
            for saving in (False, True):
                caches = [store.cache_for(model, "decode", ids) for _ in range(turns)]  # all but the last token
                for cache in caches:
                    cache.wait_loaded()
                with clock as c:
                    for t, cache in enumerate(caches):
                        out = model.generate(ids, past_key_values=cache, **gen)
                        if saving:
                            store.save(f"turn{r}-{t}", cache, out)
                    store.flush()
                if r:  # the first round warms up
                    (on if saving else off).append(turns * args.decode_tokens / c.seconds)
                del caches
                for t in range(turns):
                    store.drop(f"turn{r}-{t}")
                bar.update()
        bar.close()
    return {"history": hist, "tokens": args.decode_tokens, "turns": turns,
            "tok_s_saving_off": statistics.median(off), "tok_s_saving_on": statistics.median(on),
            "ratio": statistics.median(on) / statistics.median(off)}


def add_parser(sub) -> None:
    o = sub.add_parser("overlap", help="layer-wise restore: full / load / new / sync / layered, and decode with "
                                       "asynchronous saving on vs off")
    o.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    o.add_argument("--model", default=None, help=f"a model dir, or a random-weight shape: {', '.join(SHAPES)} "
                                                 "(default: the bundled Gemma 3 270M)")
    o.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    o.add_argument("--histories", type=positive_int, nargs="+", default=None,
                   help="default: 1024 2048 4096 (CPU), plus 8192 on CUDA")
    o.add_argument("--new", type=positive_int, default=100)
    o.add_argument("--tier", choices=["dram", "disk"], default="dram", help="where the record is restored from")
    o.add_argument("--dram", type=size, default="64GB")
    o.add_argument("--repeats", type=positive_int, default=3)
    o.add_argument("--decode-tokens", type=positive_int, default=64)
    o.add_argument("--decode-history", type=positive_int, default=1024)
    o.add_argument("--decode-turns", type=positive_int, default=3, help="turns generated back to back per timed block")
    o.add_argument("--restore-thread", action="store_true",
                   help="issue the restore from the loader thread on CUDA too (StoreConfig.restore_thread)")
    o.add_argument("--group-layers", type=positive_int, default=None,
                   help="also time the layered turn with groups of this many layers (cache.GROUP_LAYERS; "
                        "accelerators only), interleaved with the default: columns layered_alt, "
                        "layered_alt_vs_max")
    o.add_argument("--fixed-groups", action="store_true",
                   help="also time the layered turn with restore groups of the fixed schedule (1, 1, 2, then "
                        "--group-layers or cache.GROUP_LAYERS), not sized by the turn's pace (cache.GROUP_PACING), "
                        "interleaved with the default: columns layered_alt, layered_alt_vs_max")
    o.add_argument("--json", type=writable_parent, default=None)


COLUMNS = ["history", "new_tokens", "tier", "full", "load", "new", "sync", "layered", "both", "tail", "tail_split",
           "staged", "auto", "auto_choice", "layered_vs_max", "staged_vs_new", "sync_vs_layered", "full_vs_layered",
           "auto_vs_full", "max_logit_diff"]
#: with --group-layers
ALT_COLUMNS = ["layered_alt", "group_layers_alt", "layered_alt_vs_max"]
