"""A small serving loop: runs conversation turns in queue order and feeds the queue to the store's scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .store import AttentionStore

MODES = ("recompute", "hf_dynamic", "attnstore_lru", "attnstore_scheduler", "attnstore_scheduler_staged")


@dataclass
class TurnResult:
    session: str
    turn: int
    prompt_tokens: int
    reused: int
    source: str | None
    ttft_s: float
    turn_s: float
    first_token: int = -1
    plan: dict | None = None  # attnstore modes: what the store chose for the turn (cache.restore_plan)


@dataclass
class ServingLoop:
    """Serves turns with one of :data:`MODES`. Replies are teacher-forced after the first generated token so
    every mode processes the same tokens.

    * ``recompute`` — every turn prefills the whole history (transformers' default);
    * ``hf_dynamic`` — each session's ``DynamicCache`` is kept in memory between turns (transformers' recipe);
    * ``attnstore_*`` — an :class:`AttentionStore` (bounded DRAM/disk) restores the history;
      ``attnstore_scheduler_staged`` also starts restoring the turn at the head of the queue while the current
      turn generates (:meth:`AttentionStore.stage`), as CachedAttention's read buffer does.
    """

    model: object
    mode: str
    store: AttentionStore | None = None
    histories: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode.startswith("attnstore") and self.store is None:
            raise ValueError(f"mode {self.mode} needs a store")

    def plan(self, upcoming: list[str]) -> None:
        """The queue changed: tell the store (scheduler-aware prefetch and eviction)."""
        if self.mode.startswith("attnstore_scheduler"):
            self.store.plan(upcoming)

    @torch.no_grad()
    def run_turn(self, session: str, turn: int, user_ids: list[int], reply_ids: list[int],
                 stage_next: tuple[str, list[int]] | None = None) -> TurnResult:
        """Serve one turn. ``stage_next``: (session, user message ids) of the turn at the head of the queue; with
        ``attnstore_scheduler_staged`` its restore starts once this turn's first token is out."""
        history = self.histories.get(session, [])
        device = next(self.model.parameters()).device  # (the teacher-forced forward below is not generate())
        ids = torch.tensor([history + user_ids], device=device)
        t0 = time.perf_counter()
        reused, source, cache = 0, None, None
        if self.mode == "hf_dynamic":
            cache = self.caches.get(session) or DynamicCache(config=self.model.config)
            reused = cache.get_seq_length()
        elif self.mode.startswith("attnstore"):
            cache = self.store.cache_for(self.model, session, ids)
            ids = cache.input_ids
            reused, source = cache.reused_tokens, cache.source
        kwargs = {} if cache is None else {"past_key_values": cache}
        first = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                    **kwargs)
        ttft = time.perf_counter() - t0
        if stage_next is not None and self.mode == "attnstore_scheduler_staged" and stage_next[0] != session:
            nxt, nxt_ids = stage_next
            self.store.stage(self.model, nxt, torch.tensor([self.histories.get(nxt, []) + list(nxt_ids)],
                                                           device=device))
        full = ids[0].tolist() + reply_ids
        if cache is not None and reply_ids:  # teacher-force the recorded reply into the cache
            self.model(torch.tensor([reply_ids], device=device), past_key_values=cache, use_cache=True)
        if self.mode == "hf_dynamic":
            self.caches[session] = cache
            held = sum(layer.keys.numel() * layer.keys.element_size() * 2
                       for c in self.caches.values() for layer in c.layers if layer.keys is not None)
            self.peak_memory_bytes = max(self.peak_memory_bytes, held)
        elif self.mode.startswith("attnstore"):
            self.store.save(session, cache, torch.tensor([full]))
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.store.dram.used)
        self.histories[session] = full
        return TurnResult(session, turn, ids.shape[1], reused, source, ttft, time.perf_counter() - t0,
                          int(first[0, -1]), getattr(cache, "restore_plan", None))
