"""Snapshot: host copies of a cache's pre-RoPE K/V taken without blocking compute (a write stream on CUDA)."""

from __future__ import annotations

import threading

import torch

from ..codec import encode


class Snapshot:
    """What :meth:`AttentionStore.save` hands to its background thread.

    * CUDA: the layers are encoded and copied device-to-host on a *write stream* into page-locked buffers; the
      compute stream is not synchronised. The source tensors are marked as used by that stream
      (``record_stream``), so the caching allocator never hands their memory out while the copy runs, and a later
      in-place change of the cache first makes the compute stream wait for the copy (:meth:`wait_copied`).
    * CPU: the background thread copies the layers (:meth:`host_parts`); until it has, the cache waits before any
      in-place change.
    """

    def __init__(self, cache, codec: str):
        self.codec = codec
        self.raws = cache.raw_layers()  # views; waits for a layer-wise restore still running
        self.starts = [start for _, _, start in self.raws]
        self.dtype = next((r.dtype for r, _, _ in self.raws if r.numel()), None)
        self._copied = threading.Event()
        self._event = None
        self._host: list[dict[str, torch.Tensor]] | None = None
        device = self.raws[0][0].device if self.raws and self.raws[0][0].numel() else torch.device("cpu")
        self.device = device
        if device.type == "cuda":
            current = torch.cuda.current_stream(device)
            self.stream = torch.cuda.Stream(device=device)
            self.stream.wait_stream(current)
            host = []
            with torch.cuda.stream(self.stream):
                for raw, values, _ in self.raws:
                    raw.record_stream(self.stream)
                    values.record_stream(self.stream)
                    parts = encode(raw, values, codec)
                    host.append({k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                                 for k, t in parts.items()})
                self._event = torch.cuda.Event()
                self._event.record(self.stream)
            self._host = host
            self.raws = None
            self._copied.set()  # in-place changes only need the compute stream to wait (wait_copied)
        cache._snapshot = self

    def wait_copied(self) -> None:
        """Called by the cache before it changes in place: the copies must have read it first."""
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
        else:
            self._copied.wait()

    def host_parts(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, the encoded host tensors (``k``, ``v``, and scales for quantized codecs). Background thread."""
        if self._event is not None:
            self._event.synchronize()
            return self._host
        try:
            out = []
            with torch.no_grad():
                for raw, values, _ in self.raws:
                    parts = encode(raw.detach(), values.detach(), self.codec)
                    out.append({k: t.to("cpu", copy=True) for k, t in parts.items()})
            return out
        finally:
            self.raws = None
            self._copied.set()
