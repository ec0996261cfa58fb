"""A Trainer-free chat loop: every turn resumes the conversation's stored KV cache and saves it back."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
import weakref

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from ..config import StoreConfig, default_disk_dir
from ..models import DEFAULT_MODEL, load_model
from ..record import session_key
from ..store import AttentionStore
from .common import positive_int, readable_file, run_main, session_id, size

DEMO_TURNS = [
    "Hi! I am planning a three-day trip to Lisbon in spring. What should I see first?",
    "Great. Which neighbourhood would you stay in, and why?",
    "Thanks. Can you summarise the plan we discussed in two sentences?",
]
SYSTEM = "The following is a conversation between a curious user and a helpful, knowledgeable assistant.\n"
COMMANDS = "/undo  /sessions  /reset  /stats  /quit"
DEMO_SESSION = "demo"  # the demo starts its session over: never the user's own (the default "chat")
#: StoreConfig.sliding_extra_tokens of the chat: Gemma 3's sliding layers keep the tokens of the last exchange that
#: left their window, so /undo (and the next message after it) restores the history instead of recomputing it
UNDO_TOKENS = 512


_STOPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def stop_at_newline(tok) -> StoppingCriteriaList:
    """generate()'s criterion for ending a reply at the end of its line, built once per tokenizer:
    ``generate(stop_strings=..., tokenizer=...)`` builds it again at every call, which was 0.65 s of every turn's
    time to first token with Gemma 3's 262k-token vocabulary (0.14 s with it built once)."""
    crit = _STOPS.get(tok)
    if crit is None:
        crit = _STOPS[tok] = StoppingCriteriaList([StopStringCriteria(tok, ["\n"])])
    return crit


class _Stream(BaseStreamer):
    """Prints new tokens as they are generated and notes when the first one arrived."""

    def __init__(self, tok, echo: bool):
        self.tok, self.echo = tok, echo
        self.start = time.perf_counter()
        self.first: float | None = None
        self._prompt_seen = False
        self._ids: list[int] = []
        self._printed = 0

    def put(self, value):
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        if self.first is None:
            self.first = time.perf_counter()
        self._ids += value.reshape(-1).tolist()
        if self.echo:
            text = self.tok.decode(self._ids, skip_special_tokens=True)
            print(text[self._printed:].replace("\n", ""), end="", flush=True)
            self._printed = len(text)

    def end(self):
        if self.echo:
            print(flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with a model; each turn restores the conversation's KV cache. "
                                            f"Commands: {COMMANDS}")
    p.add_argument("--model", default=DEFAULT_MODEL, help="local model directory (default: bundled Gemma 3 270M)")
    p.add_argument("--session", type=session_id, default=None,
                   help=f"conversation name: it persists and resumes across runs (default: chat; with --demo: "
                        f"{DEMO_SESSION}, which the demo starts over)")
    p.add_argument("--disk-dir", default=str(default_disk_dir()), help="disk tier directory")
    p.add_argument("--dram", type=size, default="2GB", help="DRAM tier capacity")
    p.add_argument("--namespace", default="default")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--demo", action="store_true", help="play a scripted 3-turn conversation and compare with recompute")
    p.add_argument("--new", action="store_true", help="start the session over (forget what is stored)")
    p.add_argument("--jsonl", action="store_true",
                   help="non-interactive: user turns one per line (stdin or --input), one JSON object per reply")
    p.add_argument("--input", type=readable_file, default=None, help="file of user turns for --jsonl (default: stdin)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def user_prompt_ids(tok, history: list[int], user: str) -> list[int]:
    """Token ids that append a user message and the start of the assistant's reply to ``history``.

    The tokenizer's chat template when it has one; otherwise plain ``User: ...`` / ``Assistant:`` lines.
    """
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if history and tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]:
            ids = ids[1:]
        return ids
    sep = "" if not history or tok.decode(history[-1:]).endswith("\n") else "\n"
    prompt = (SYSTEM if not history else "") + f"{sep}User: {user}\nAssistant:"
    return tok(prompt, add_special_tokens=not history).input_ids


def turn(model, tok, store, session: str, history: list[int], user: str, max_new_tokens: int, echo: bool = False):
    """One chat turn: extend ``history`` with the user's message, generate, save. Returns (reply, ids, info)."""
    ids = torch.tensor([history + user_prompt_ids(tok, history, user)])
    stream = _Stream(tok, echo)
    cache = store.cache_for(model, session, ids)
    ids = cache.input_ids  # the kept tokens + the new ones, if the conversation outgrew the window
    with torch.no_grad():
        # every id is the conversation's, a generated pad id too: masked by none (generate() would infer a mask)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=stop_at_newline(tok),
                             streamer=stream)
    rec = store.save(session, cache, out).result()
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    per_token = rec.nbytes / max(rec.num_tokens, 1) if rec is not None else 0.0
    info = {"ttft_s": (stream.first or time.perf_counter()) - stream.start, "prompt_tokens": ids.shape[1],
            "restored": cache.reused_tokens, "prefilled": ids.shape[1] - cache.reused_tokens,
            "source": cache.source, "restored_bytes": int(per_token * cache.reused_tokens),
            "truncated": cache.truncated}
    return reply, out[0].tolist(), info


def undo(model, store, session: str, history: list[int]) -> dict:
    """Make ``history`` (the conversation before the exchanges undone) the session's stored state: restored from
    the record of the longer conversation where the sliding layers still hold their window (recomputed
    otherwise) and saved. Like a turn's record it leaves the last token without K/V (the next turn prefills it),
    so going back here once more needs the window a turn starting here kept. Returns what was restored."""
    if not history:
        store.drop(session)
        return {"restored": 0, "prefilled": 0, "source": None}
    cache = store.cache_for(model, session, torch.tensor([history]))
    ids = cache.input_ids
    # (a truncated history is remapped: its first forward must take every token not restored)
    stop = ids.shape[1] if cache.truncated or ids.shape[1] < 2 else ids.shape[1] - 1
    if cache.reused_tokens < stop:
        with torch.no_grad():
            model(input_ids=ids[:, cache.reused_tokens: stop], attention_mask=torch.ones_like(ids[:, :stop]),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
    store.save(session, cache, ids).result()
    return {"restored": cache.reused_tokens, "prefilled": stop - cache.reused_tokens, "source": cache.source}


class _Turns:
    """Where a session's exchanges began (lengths of its history), kept beside the store's records so that /undo
    also goes back over the exchanges of earlier runs: ``<disk_dir>/chat-turns/<session key>.json``. Trusted only
    while it describes the history the store holds (a hash of its ids); a file that cannot be read or written is
    no undo across runs, nothing worse."""

    def __init__(self, store, session: str):
        self.path = (None if store.disk is None
                     else store.disk.dir / "chat-turns" / f"{session_key(store.namespace, session)}.json")

    @staticmethod
    def _digest(history: list[int]) -> str:
        return hashlib.sha256(json.dumps(history).encode()).hexdigest()

    def load(self, history: list[int]) -> list[int]:
        try:
            data = json.loads(self.path.read_text())
            starts = data["starts"]
            ok = data["digest"] == self._digest(history) and isinstance(starts, list) and starts == sorted(starts)
            ok = ok and all(isinstance(x, int) and 0 <= x < len(history) for x in starts)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return []
        return starts if ok else []

    def save(self, history: list[int], starts: list[int]) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"digest": self._digest(history), "starts": starts}))
            os.replace(tmp, self.path)
        except OSError:
            pass

    def clear(self) -> None:
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass


def _stats_line(info: dict) -> str:
    src = f" from {info['source']}" if info["source"] else ""
    trunc = f" | {info['truncated']} oldest tokens dropped" if info["truncated"] else ""
    return (f"  [ttft {info['ttft_s']:.2f} s | restored {info['restored']} tokens{src} "
            f"({info['restored_bytes'] / 1e6:.1f} MB not recomputed) | prefilled {info['prefilled']}{trunc}]")


def main(argv=None) -> int:
    parser = build_parser()
    return run_main(parser, lambda args: _main(_checked(parser, args)), argv)


def _checked(parser: argparse.ArgumentParser, args):
    if args.input is not None and not args.jsonl:
        parser.error("--input is read by --jsonl only")
    if args.session is None:
        args.session = DEMO_SESSION if args.demo else "chat"
    return args


def _text(line: str) -> str:
    """A line read from a terminal or a file, as text the tokenizer takes: bytes that were not UTF-8 (Python keeps
    them as lone surrogates) become U+FFFD."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _main(args) -> int:
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    # the store first: a disk directory that cannot be used is said before the model loads
    store = AttentionStore(StoreConfig(dram_bytes=args.dram, disk_dir=args.disk_dir, namespace=args.namespace,
                                       sliding_extra_tokens=UNDO_TOKENS))
    try:
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), progress=not args.jsonl)
        stop_at_newline(tok)  # built now, not inside the first turn's time to first token
        if args.new or args.demo:
            store.drop(args.session)
        history = store.history(args.session) or []
        if args.demo:
            return run_demo(model, tok, store, args)
        if args.jsonl:
            return run_jsonl(model, tok, store, args, history)
        return run_interactive(model, tok, store, args, history)
    finally:
        store.close()


def run_interactive(model, tok, store, args, history: list[int]) -> int:
    if history:
        last = tok.decode(history[-80:], skip_special_tokens=True).strip().splitlines()[-2:]
        print(f"(resuming session {args.session!r}: {len(history)} tokens of history restored from the store)")
        for line in last:
            print(f"  … {line}")
    print(f"Type a message. Commands: {COMMANDS}")
    turns = _Turns(store, args.session)
    starts = turns.load(history)  # the history's length before each exchange (what /undo goes back to)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = _text(line)
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print(f"Commands: {COMMANDS}")
            continue
        if line == "/undo":
            if not starts:
                print("(nothing to undo: /undo goes back over the exchanges made in this chat since the "
                      "conversation was last truncated)")
                continue
            back = history[: starts.pop()]
            got = undo(model, store, args.session, back)
            src = f" from {got['source']}" if got["source"] else ""
            print(f"(undid the last exchange, {len(history) - len(back)} tokens; the history before it: "
                  f"{got['restored']} tokens restored{src}, {got['prefilled']} prefilled)")
            history = back
            turns.save(history, starts)
            continue
        if line == "/reset":
            store.drop(args.session)
            history, starts = [], []
            turns.clear()
            print(f"(session {args.session!r} forgotten)")
            continue
        if line == "/stats":
            print(json.dumps(store.stats(), indent=1))
            continue
        if line == "/sessions":
            for s in store.sessions():
                sid = s["session_id"]
                sid = sid if sid.isprintable() else repr(sid)  # (a newline would break the table)
                print(f"  {sid:<20} {s['tokens']:>6} tokens  {s['bytes'] / 1e6:7.1f} MB  {s['tier']}")
            continue
        if line.startswith("/") and " " not in line:
            print(f"(unknown command {line}: not sent to the model. Commands: {COMMANDS})")
            continue
        print("assistant> ", end="", flush=True)
        try:
            before = len(history)
            _, history, info = turn(model, tok, store, args.session, history, line, args.max_new_tokens, echo=True)
            # a truncated turn's history holds the kept tokens only: the lengths before it no longer apply
            starts = [] if info["truncated"] else starts + [before]
            turns.save(history, starts)
        except KeyboardInterrupt:  # stop this reply, not the chat; go on from what the store holds
            print("\n(interrupted)")
            history = store.history(args.session) or []
            continue
        print(_stats_line(info))


def run_jsonl(model, tok, store, args, history: list[int]) -> int:
    src = open(args.input, encoding="utf-8", errors="surrogateescape") if args.input else sys.stdin
    resumed = len(history)
    with src:
        lines = (t for t in (_text(raw.rstrip("\n")) for raw in src) if t.strip())  # blank lines are no turn
        for i, line in enumerate(lines):
            reply, history, info = turn(model, tok, store, args.session, history, line, args.max_new_tokens)
            print(json.dumps({"turn": i, "user": line, "reply": reply, "resumed_history_tokens": resumed,
                              "history_ids": history, **info}), flush=True)
    return 0


def run_demo(model, tok, store, args) -> int:
    history: list[int] = []
    for user in DEMO_TURNS:
        print(f"user> {user}")
        print("assistant> ", end="", flush=True)
        _, history, info = turn(model, tok, store, args.session, history, user, args.max_new_tokens, echo=True)
        print(_stats_line(info))
    # the last turn once more, recomputed from scratch, to show what the store saved and that nothing changed
    ids = torch.tensor([history[: info["prompt_tokens"]]])
    stream = _Stream(tok, echo=False)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, stopping_criteria=stop_at_newline(tok), streamer=stream)
    ttft_ref = stream.first - stream.start
    same = ref[0].tolist() == history
    print(f"\nlast turn recomputed without the store: ttft {ttft_ref:.2f} s vs {info['ttft_s']:.2f} s restored "
          f"({ttft_ref / max(info['ttft_s'], 1e-9):.1f}x); same tokens: {same}")
    s = store.stats()
    print(f"store: {s['hits']} hits / {s['lookups']} lookups, {s['reused_tokens']} tokens restored, "
          f"{s['prefilled_tokens']} prefilled")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
