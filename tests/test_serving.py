"""The serving loop behind ``bench.py replay``: every mode gives the recompute's first tokens."""

from __future__ import annotations

import torch

from attnstore_hf import AttentionStore, StoreConfig
from attnstore_hf.serving import MODES, ServingLoop
from conftest import random_ids, tiny_model


def test_every_mode_gives_the_same_first_tokens_and_staging_is_used(tmp_path):
    model = tiny_model("llama")
    # three sessions, interleaved; the queue head is staged while a turn generates
    order = [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("b", 1), ("a", 2), ("c", 1), ("b", 2)]
    msgs = {t: random_ids(9 + 3 * t[1], k)[0].tolist() for k, t in enumerate(order)}
    replies = {t: random_ids(7, 100 + k)[0].tolist() for k, t in enumerate(order)}
    firsts, stats = {}, {}
    for mode in MODES:
        store = None
        if mode.startswith("attnstore"):
            store = AttentionStore(StoreConfig(dram_bytes="1MB", disk_dir=tmp_path / mode, restore_mode="load",
                                               policy="scheduler" if "scheduler" in mode else "lru"))
        loop = ServingLoop(model, mode, store)
        rows = []
        for k, (s, j) in enumerate(order):
            queue = order[k + 1:]
            loop.plan([q[0] for q in queue])
            head = (queue[0][0], msgs[queue[0]]) if queue else None
            rows.append(loop.run_turn(s, j, msgs[(s, j)], replies[(s, j)], stage_next=head))
        firsts[mode] = [r.first_token for r in rows]
        if store is not None:
            store.close()
            stats[mode] = store.stats()
            assert all(r.reused > 0 for r in rows if r.turn > 0), mode  # every later turn restored its history
    assert all(f == firsts["recompute"] for f in firsts.values()), firsts
    with torch.no_grad():  # and recompute's first tokens are the model's own
        history = {}
        for (s, j), first in zip(order, firsts["recompute"]):
            ids = torch.tensor([history.get(s, []) + msgs[(s, j)]])
            assert int(model(ids).logits[0, -1].argmax()) == first
            history[s] = ids[0].tolist() + replies[(s, j)]
    # every turn but the first was staged (the head of the queue was always another session) and handed over
    assert stats["attnstore_scheduler_staged"]["staged"] == stats["attnstore_scheduler_staged"]["staged_used"] == 7
    assert stats["attnstore_scheduler"]["staged"] == stats["attnstore_lru"]["staged"] == 0
