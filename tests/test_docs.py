"""The how-to code in the docs runs as written, on the bundled model, in a fresh directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)


def run_block(code: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_quickstart_example_runs_and_persists(tmp_path):
    from attnstore_hf import AttentionStore, StoreConfig

    code, going_back = python_blocks("quickstart.md")
    run_block(code, tmp_path)
    with AttentionStore(StoreConfig(disk_dir=str(tmp_path / "kv"))) as store:  # a new process would see this
        (session,) = store.sessions()
        history = store.history("alice")
    assert session["session_id"] == "alice" and session["tier"] == "disk"
    assert history is not None and len(history) == session["tokens"] + 1 > 32  # prompt + 32 generated tokens
    out = run_block(going_back, tmp_path)
    restored, before = map(int, re.search(r"restored (\d+) tokens \((\d+) before the edited", out).groups())
    assert restored >= before > 0, out  # (the edited message's first tokens match the stored one's too)


def test_serving_howto_restores_every_second_turn_and_uses_staged_turns(tmp_path):
    (code,) = python_blocks("serving.md")
    out = run_block(code, tmp_path)
    turns = dict(re.findall(r"^(\w+ turn \d): restored (\d+) of \d+ prompt tokens$", out, re.M))
    assert set(turns) == {f"{s} turn {k}" for s in ("alice", "bob", "carol") for k in (0, 1)}, out
    assert all(int(turns[f"{s} turn 1"]) > 0 for s in ("alice", "bob", "carol")), out
    assert all(int(turns[f"{s} turn 0"]) == 0 for s in ("alice", "bob", "carol")), out
    hits, lookups, staged = map(int, re.search(r"hits (\d+) / (\d+), staged turns used (\d+)", out).groups())
    assert (hits, lookups) == (3, 6) and staged >= 3, out
