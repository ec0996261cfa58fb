"""restore_both: recompute the first tokens of a stored prefix while the rest loads, then join the two."""

from __future__ import annotations

import logging

import torch

from .loader import LayerLoader, LoadError

log = logging.getLogger(__name__)


@torch.no_grad()
def restore_both(cache, model, record, reuse: int, split: int, total_len: int) -> bool:
    """Fill ``cache`` with the first ``reuse`` tokens of ``record``: tokens ``[0, split)`` are recomputed by the
    model (a forward of the decoder on the current stream) while tokens ``[split, reuse)`` are loaded in the
    background (thread / side stream); both finish, then each layer is the concatenation. Exact: the computed
    keys are the model's own, the loaded ones are re-rotated for their positions. Returns ``False`` if a sliding
    layer lacks the window of the loaded part, or if loading failed (then nothing is changed: the turn recomputes,
    with a warning)."""
    from ..cache import SlidingLayer, _device_dtype, restore_jobs

    device = _device_dtype(model)[0]
    keep = torch.arange(split, reuse)
    staged: list = [None] * len(cache.layers)
    jobs = restore_jobs(cache, model, record, keep, keep, total_len, into_cache=False, out=staged)
    if jobs is None:
        return False
    loader = LayerLoader(jobs, device, keepalive=record).start()
    failed = None
    try:
        head = cache.prefill_apart(torch.tensor([record.token_ids[:split]], dtype=torch.long, device=device))
    finally:
        try:
            loader.wait_all()  # the current stream now waits for the loads too
        except LoadError as exc:
            failed = exc
    if failed is not None:  # (the cache is not touched before this point)
        log.warning("session %r: loading the stored KV failed (%s); recomputing", cache.session_id, failed)
        return False
    if loader.stream is not None:  # made on the side stream, read on this one: not reused before that is done
        for part in staged:
            for t in part:
                t.record_stream(torch.cuda.current_stream(device))
    for work, part, (k, v, raw) in zip(cache.layers, head.layers, staged):
        if isinstance(work, SlidingLayer):
            n = min(reuse, work.sliding_window - 1)
            keys = torch.cat([part.keys, k], dim=-2)[:, :, -n:]
            values = torch.cat([part.values, v], dim=-2)[:, :, -n:]
            raws = torch.cat([part.raw_keys, raw], dim=-2)[:, :, -n:]
            work.restore(keys, values, raws, cumulative_length=reuse)
        else:
            head_raw, head_values, _ = part.raw_state()
            work.prepare(reuse, k[:, :, :0], v[:, :, :0], capacity=total_len)
            work.fill(torch.cat([part.keys, k], -2), torch.cat([head_values, v], -2), torch.cat([head_raw, raw], -2))
    cache.reused_tokens = reuse
    return True
