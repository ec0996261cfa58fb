"""Helpers the command-line tools share: timing the first token of generate()."""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer


class FirstTokenTimer(BaseStreamer):
    """A generate() streamer that notes when the first new token arrives (generate puts the prompt first)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self._calls = 0

    def put(self, value):
        self._calls += 1
        if self._calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass

    @property
    def ttft(self) -> float:
        return (self.first or time.perf_counter()) - self.start


@torch.no_grad()
def timed_generate(model, ids, cache=None, t0: float | None = None, **kwargs):
    """generate() that also returns the time to first token, counted from ``t0`` (default: now)."""
    timer = FirstTokenTimer()
    if t0 is not None:
        timer.start = t0
    extra = {} if cache is None else {"past_key_values": cache}
    out = model.generate(ids, streamer=timer, **extra, **kwargs)
    return out, timer.ttft
