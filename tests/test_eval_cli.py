"""The accuracy evaluation runs end to end on the real model (tiny settings) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_eval_accuracy_small_run(tmp_path):
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_accuracy.py"), "--window", "256",
                        "--conversations", "1",
                        "--samples", "1", "--max-turns", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["perplexity"]) == {"CA", "TT", "NKVT"}
    assert data["n_tokens"] > 100 and data["truncations"] >= 1
    assert all(1.0 < p < 1e6 for p in data["perplexity"].values())
    assert set(data["retrieval_accuracy"]) == {"CA", "TT", "NKVT", "full"}
    assert data["ppl_rel_delta_vs_TT"]["TT"] == 0.0


@pytest.mark.parametrize("window", ["100", "2048"])
def test_a_window_the_retrieval_task_cannot_use_is_said_before_the_perplexity_stage(window, capsys, monkeypatch):
    """--window 100 failed with "empty range for randrange()" and --window 2048 with a SystemExit, each only after
    the whole perplexity stage (a minute or more)."""
    from attnstore_hf.cli import eval_accuracy

    def never(*a, **k):
        raise AssertionError("the perplexity stage ran")

    monkeypatch.setattr(eval_accuracy, "perplexity", never)
    monkeypatch.setattr(eval_accuracy, "conversations_for_ppl", never)
    with pytest.raises(SystemExit) as exc:
        eval_accuracy.main(["--window", window])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--window: the retrieval task needs 175 to 1714 tokens" in err and "Traceback" not in err
