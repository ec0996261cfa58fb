"""The chat's non-interactive mode over two processes: the second resumes the first's session exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_chat(tmp_path, lines):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "chat.py"), "--jsonl", "--session", "alice",
                        "--disk-dir",
                        str(tmp_path / "kv"), "--max-new-tokens", "12"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_second_process_resumes_and_answers_like_recompute(tmp_path):
    from attnstore_hf.models import load_model

    first = run_chat(tmp_path, ["Hello! What is the capital of France?", "And of Italy?", "And of Spain?"])
    assert [t["resumed_history_tokens"] for t in first] == [0, 0, 0]
    for before, t in zip(first, first[1:]):  # every later turn restores the whole history before it
        assert t["source"] == "dram" and t["restored"] == len(before["history_ids"]) - 1, t
    second = run_chat(tmp_path, ["Which of them is largest?"])
    (t,) = second
    history = first[-1]["history_ids"]
    assert t["resumed_history_tokens"] == len(history)  # the history came back from the first process's disk
    assert t["source"] == "disk" and t["restored"] == len(history) - 1
    model, tok = load_model(progress=False)
    prompt = torch.tensor([t["history_ids"][: t["prompt_tokens"]]])
    assert prompt[0, : len(history)].tolist() == history
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_strings=["\n"], tokenizer=tok)
    assert ref[0].tolist() == t["history_ids"]  # the same answer as a recompute (greedy)


def test_demo_commands_and_odd_input_leave_the_users_session_alone(tmp_path):
    """Found by a review of the tools: --demo started the user's default session ("chat") over; a mistyped
    /command was sent to the model and kept in the history; a line that is not UTF-8 crashed the tokenizer."""
    from attnstore_hf import AttentionStore, StoreConfig
    from attnstore_hf.models import load_model

    chat = [sys.executable, str(ROOT / "scripts" / "chat.py"), "--disk-dir", str(tmp_path / "kv"),
            "--max-new-tokens", "4"]
    r = subprocess.run(chat + ["--jsonl"], input="My cat is called Zorblax.\n", capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(chat + ["--demo"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(chat, input=b"/help\n/sesions\ncaf\xe9?\n/sessions\n/quit\n", capture_output=True,
                       timeout=600)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "Commands:" in out and "unknown command /sesions" in out
    assert "demo" in out and "chat" in out  # /sessions lists both
    _, tok = load_model(progress=False)
    with AttentionStore(StoreConfig(disk_dir=tmp_path / "kv")) as store:
        text = tok.decode(store.history("chat"))
        assert "Zorblax" in text and "caf\ufffd?" in text and "/sesions" not in text and "Lisbon" not in text
        assert "Lisbon" in tok.decode(store.history("demo"))
