"""A Trainer-free chat loop: every turn resumes the conversation's stored KV cache and saves it back."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

import torch

from ..config import StoreConfig, default_disk_dir
from ..models import DEFAULT_MODEL, load_model
from ..store import AttentionStore
from .common import timed_generate

DEMO_TURNS = [
    "Hi! I am planning a three-day trip to Lisbon in spring. What should I see first?",
    "Great. Which neighbourhood would you stay in, and why?",
    "Thanks. Can you summarise the plan we discussed in two sentences?",
]
SYSTEM = "The following is a conversation between a curious user and a helpful, knowledgeable assistant.\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with a model; each turn restores the conversation's KV cache.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local model directory (default: bundled Gemma 3 270M)")
    p.add_argument("--session", default="chat", help="conversation id (resumes across runs)")
    p.add_argument("--disk-dir", default=str(default_disk_dir()), help="disk tier directory")
    p.add_argument("--dram", default="2GB", help="DRAM tier capacity")
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--demo", action="store_true", help="play a scripted 3-turn conversation and compare with recompute")
    p.add_argument("--new", action="store_true", help="start the session over (forget what is stored)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def turn(model, tok, store, session: str, history: list[int], user: str, max_new_tokens: int):
    """One chat turn: extend ``history`` with the user's message, generate, save. Returns (reply, ids, info)."""
    sep = "" if not history or tok.decode(history[-1:]).endswith("\n") else "\n"
    prompt = (SYSTEM if not history else "") + f"{sep}User: {user}\nAssistant:"
    new_ids = tok(prompt, add_special_tokens=not history).input_ids
    ids = torch.tensor([history + new_ids])
    t0 = time.perf_counter()
    cache = store.cache_for(model, session, ids)
    out, ttft = timed_generate(model, ids, cache, t0=t0, max_new_tokens=max_new_tokens, do_sample=False,
                               stop_strings=["\n"], tokenizer=tok)
    store.save(session, cache, out)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    info = {"ttft_s": ttft, "prompt_tokens": ids.shape[1], "reused": cache.reused_tokens, "source": cache.source}
    return reply, out[0].tolist(), info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    store = AttentionStore(StoreConfig(dram_bytes=args.dram, disk_dir=args.disk_dir, namespace=args.namespace))
    if args.new or args.demo:
        store.drop(args.session)
    history = store.history(args.session) or []
    if history:
        print(f"(resuming session {args.session!r}: {len(history)} tokens of history)")
    try:
        if args.demo:
            return run_demo(model, tok, store, args)
        print("Type a message (Ctrl-D to quit).")
        for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
            line = line.strip()
            if not line:
                continue
            reply, history, info = turn(model, tok, store, args.session, history, line, args.max_new_tokens)
            print(f"assistant> {reply}")
            print(f"  [ttft {info['ttft_s']:.2f} s | restored {info['reused']}/{info['prompt_tokens']} tokens"
                  f"{' from ' + info['source'] if info['source'] else ''}]")
    except (EOFError, KeyboardInterrupt):
        print()
    finally:
        store.close()
    return 0


def run_demo(model, tok, store, args) -> int:
    history: list[int] = []
    for user in DEMO_TURNS:
        print(f"user> {user}")
        reply, history, info = turn(model, tok, store, args.session, history, user, args.max_new_tokens)
        print(f"assistant> {reply}")
        print(f"  [ttft {info['ttft_s']:.2f} s | restored {info['reused']}/{info['prompt_tokens']} prompt tokens"
              f"{' from ' + info['source'] if info['source'] else ''}]")
    # the last turn once more, recomputed from scratch, to show what the store saved and that nothing changed
    last_prompt = history[: info["prompt_tokens"]]
    ids = torch.tensor([last_prompt])
    ref, ttft_ref = timed_generate(model, ids, None, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   stop_strings=["\n"], tokenizer=tok)
    same = ref[0].tolist() == history
    print(f"\nlast turn recomputed without the store: ttft {ttft_ref:.2f} s vs {info['ttft_s']:.2f} s restored "
          f"({ttft_ref / max(info['ttft_s'], 1e-9):.1f}x); same tokens: {same}")
    s = store.stats()
    print(f"store: {s['hits']} hits / {s['lookups']} lookups, {s['reused_tokens']} tokens restored, "
          f"{s['prefilled_tokens']} prefilled")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
