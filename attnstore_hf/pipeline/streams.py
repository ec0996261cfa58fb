"""Side streams kept for the life of the process, one per device and purpose.

The CUDA caching allocator hands a freed block only to later allocations on the stream it was used on. With a
new stream for every restore (torch hands out its pooled streams in turn, 32 of them), each restore's staging
temporaries would miss the cache (``cudaMalloc`` on the hot path) until every pooled stream had its own set
cached, and then up to 32 sets stay reserved (a group of 4 layers of a Llama-3-8B shape at 8,192 tokens: 128 MB
each). Restores share one stream per device (they queue behind each other, as they would on the copy engine
anyway), saves another, so a save never waits for a restore or the other way round.
"""

from __future__ import annotations

import threading

import torch

_streams: dict = {}
_lock = threading.Lock()


def side_stream(device, purpose: str) -> "torch.cuda.Stream":
    """The process's side stream for ``purpose`` (``"restore"``, ``"save"``) on CUDA ``device``."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, purpose)
    with _lock:
        stream = _streams.get(key)
        if stream is None:
            stream = _streams[key] = torch.cuda.Stream(device=torch.device("cuda", index))
        return stream
