"""The chat's /undo on the bundled Gemma 3 270M (sliding window 512): going back over the last exchange of a
conversation longer than the window restores the history before it (the sliding layers kept the tokens that left
their window, StoreConfig.sliding_extra_tokens), and the next turn answers exactly like a recompute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnstore_hf import AttentionStore, StoreConfig
from attnstore_hf.cli.chat import UNDO_TOKENS, turn, undo
from conftest import greedy, logit_diff

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LONG = ("Here is my travel diary so far. " + "We walked along the river, ate grilled sardines, took the old "
        "tram up the hill and watched the sunset from a viewpoint over the red roofs. " * 24).strip()


@pytest.fixture(scope="module")
def gemma():
    from attnstore_hf.models import load_model

    return load_model(progress=False)


@pytest.mark.parametrize("extra,restored", [(UNDO_TOKENS, "all"), (0, "none")])
def test_undo_restores_the_history_before_the_last_exchange(gemma, tmp_path, extra, restored):
    model, tok = gemma
    window = model.config.sliding_window
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv", sliding_extra_tokens=extra)) as store:
        _, h1, _ = turn(model, tok, store, "s", [], LONG, max_new_tokens=8)
        assert len(h1) > window + 50  # long enough that the sliding layers' window matters
        _, h2, info = turn(model, tok, store, "s", h1, "What did we eat?", max_new_tokens=8)
        assert info["restored"] == len(h1) - 1
        got = undo(model, store, "s", h1)
        assert store.history("s") == h1
        assert got["restored"] == (len(h1) - 1 if restored == "all" else 0)
        # the next turn after the undo: the history restored (all but its last token, as after a turn)
        ids = torch.tensor([h1 + tok("\nUser: Where did we watch the sunset?\nAssistant:",
                                     add_special_tokens=False).input_ids])
        cache = store.cache_for(model, "s", ids)
        assert cache.reused_tokens == len(h1) - 1
        ours, ref = greedy(model, ids, cache, new=6), greedy(model, ids, new=6)
        assert torch.equal(ours.sequences, ref.sequences)
        assert logit_diff(ours, ref) <= 1e-4


def test_undo_command_in_the_interactive_chat(tmp_path):
    chat = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--disk-dir", str(tmp_path / "kv"),
            "--max-new-tokens", "6", "--session", "trip"]
    lines = [LONG, "Which tram did we take?", "/undo", "What did we eat?", "/undo", "/undo", "/undo", "/quit"]
    r = subprocess.run(chat, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    undone = [x for x in r.stdout.splitlines() if "undid the last exchange" in x]
    assert len(undone) == 3 and "nothing to undo" in r.stdout
    # the first two undos went back to the long first exchange: restored from the store, not recomputed
    assert all("restored from dram, 0 prefilled)" in x for x in undone[:2]), undone
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv")) as store:
        assert store.history("trip") is None  # every exchange undone: nothing stored


def test_undo_goes_back_over_the_exchanges_of_an_earlier_run(tmp_path):
    """Where each exchange began is kept beside the records (``chat-turns/``), so a chat started again undoes the
    exchanges of the run before it, restoring from disk; a file that no longer describes the stored history (the
    session changed elsewhere) is not trusted."""
    chat = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--disk-dir", str(tmp_path / "kv"),
            "--max-new-tokens", "6", "--session", "trip"]
    r = subprocess.run(chat, input="\n".join([LONG, "Which tram did we take?", "/quit"]) + "\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv")) as store:
        full = store.history("trip")
        assert store.stats()["rejected_records"] == 0 and [s["session_id"] for s in store.sessions()] == ["trip"]
    r = subprocess.run(chat, input="/undo\n/quit\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = [x for x in r.stdout.splitlines() if "undid the last exchange" in x]
    assert "restored from disk, 0 prefilled)" in line, line
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv")) as store:
        first = store.history("trip")
    assert len(first) < len(full) and full[: len(first)] == first
    # the session changed behind the chat's back (the file's hash no longer matches): nothing to undo from it
    (turns,) = (tmp_path / "kv" / "chat-turns").iterdir()
    turns.write_text(turns.read_text().replace('"digest": "', '"digest": "0'))
    r = subprocess.run(chat, input="/undo\n/quit\n", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "nothing to undo" in r.stdout, r.stdout[-2000:]
