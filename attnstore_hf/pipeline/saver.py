"""Snapshot: host copies of a cache's pre-RoPE K/V taken without blocking compute (a write stream on CUDA)."""

from __future__ import annotations

import threading

import torch

from ..cache import _device_dtype
from ..codec import encode
from .streams import side_stream


def prompt_views(cache, raws, tokens: int) -> list:
    """Views of what each layer held for its first ``tokens`` positions, first batch row: after beam search the
    rows are the beams, identical up to where generation began. A sliding-window layer keeps only its last
    ``window - 1`` tokens (and the ``extra_tokens`` before them), which then include generated ones: what it holds
    before ``tokens`` is kept, ``ValueError`` if that is less than the window before ``tokens``."""
    out = []
    for (raw, values, start), layer in zip(raws, cache.layers):
        window = getattr(layer, "sliding_window", None)
        need = 0 if window is None else max(0, tokens - (window - 1))
        if need < start or start + raw.shape[-2] < tokens:
            raise ValueError(f"the cache no longer holds the K/V of the first {tokens} tokens of every layer (a "
                             f"sliding-window layer keeps only its last {window and window - 1} tokens)")
        out.append((raw[:1, :, : tokens - start], values[:1, :, : tokens - start], start))
    return out


class Snapshot:
    """What :meth:`AttentionStore.save` hands to its background thread.

    * CUDA: ``save()`` only records an event on the compute stream; the background thread then encodes and copies
      the layers device-to-host on its own *write stream* into page-locked buffers (the compute stream is never
      synchronised, and the slow page-locked allocation happens off the decoding thread). The snapshot holds the
      source tensors until the copies are issued, then marks them used by the write stream (``record_stream``),
      so their memory is never handed out while a copy reads it; a later in-place change of the cache first
      makes the compute stream wait for the copies (:meth:`wait_copied`).
    * CPU: the background thread copies the layers (:meth:`host_parts`); until it has, the cache waits before any
      in-place change.
    """

    def __init__(self, cache, codec: str, tokens: int | None = None):
        """``tokens``: keep only the first ``tokens`` positions of the first batch row (:func:`prompt_views`)."""
        self.codec = codec
        self.raws = cache.raw_layers()  # views; waits for a layer-wise restore still running
        if tokens is not None:
            self.raws = prompt_views(cache, self.raws, tokens)
        self.starts = [start for _, _, start in self.raws]
        # the record's dtype is the model's (what a lookup checks). Under torch.autocast the K/V come in other
        # dtypes than the weights, and keys and values in different ones (a float32 model under bfloat16 autocast:
        # values and pre-RoPE keys in bfloat16, a layer's buffers in float32): cast to it. Exact: pre-RoPE keys and
        # values come out of the model's own projections, in its dtype or autocast's narrower one
        self.dtype = _device_dtype(cache._model)[1]
        self._copied = threading.Event()
        self._event = None
        self.device = self.raws[0][0].device if self.raws and self.raws[0][0].numel() else torch.device("cpu")
        if self.device.type == "cuda":
            # the compute stream only records where the cache is final; the copies are issued by the background
            # thread (page-locked allocation is slow and must not stall decoding)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(self.device))
        cache._snapshots.append(self)

    def abandon(self) -> None:
        """It will never copy (its save was refused or cancelled): the cache need not wait for it."""
        self.raws = None
        self._copied.set()

    def wait_copied(self) -> None:
        """Called by the cache before it changes in place: the copies must have read it first."""
        self._copied.wait()
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)

    def host_parts(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, the encoded host tensors (``k``, ``v``, and scales for quantized codecs). Background thread."""
        try:
            out = []
            with torch.no_grad():
                if self.device.type == "cuda":
                    stream = side_stream(self.device, "save")
                    with torch.cuda.stream(stream):
                        stream.wait_event(self._ready)
                        for raw, values, start in self.raws:
                            parts = encode(raw.to(self.dtype), values.to(self.dtype), self.codec, start)
                            out.append({k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
                                t, non_blocking=True) for k, t in parts.items()})
                            raw.record_stream(stream)  # not handed out again before the copy has read them
                            values.record_stream(stream)
                        self._event = torch.cuda.Event()
                        self._event.record(stream)
                    self.raws = None
                    self._copied.set()
                    self._event.synchronize()
                    return out
                for raw, values, start in self.raws:
                    parts = encode(raw.detach().to(self.dtype), values.detach().to(self.dtype), self.codec, start)
                    out.append({k: t.to("cpu", copy=True) for k, t in parts.items()})
            return out
        finally:
            self.raws = None
            self._copied.set()
