"""``bench.py replay`` end to end on the real model and real ShareGPT turns (small)."""

from __future__ import annotations

import json

import pytest

from conftest import run_bench

pytestmark = pytest.mark.slow


def test_replay_every_mode_answers_like_recompute(tmp_path):
    out = tmp_path / "replay.json"
    run_bench(tmp_path, "replay", "--sessions", "3", "--max-turns", "3", "--user-cap", "48", "--reply-cap", "24",
              "--passes", "1", "--rate", "50", "--json", out)
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"recompute", "hf_dynamic", "attnstore_lru", "attnstore_scheduler",
                          "attnstore_scheduler_staged"}
    for name, m in modes.items():
        assert m["first_tokens_as_recompute"] == 1.0, name
        if name != "recompute":
            assert m["hit_rate"] == 1.0, name  # every later turn restored its history
    assert modes["attnstore_scheduler_staged"]["staged_used"] >= 1
    assert modes["attnstore_lru"]["staged_used"] == 0
    for name in ("attnstore_lru", "attnstore_scheduler", "attnstore_scheduler_staged"):
        counts = modes[name]["store_counts"]  # every later turn restored: the misses are the 3 first turns
        assert counts["misses"] == 3 and counts["restore_recompute"] == 0 and counts["rejected_records"] == 0, counts
        assert modes[name]["recomputed_turns"] == []  # (a turn the cost model recomputes is listed with its plan)
    assert (tmp_path / "replay.png").stat().st_size > 1000
