"""AttentionStore: looks sessions up across DRAM and disk, restores them into caches, saves them back."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..cache import AttentionStoreCache, SlidingLayer, restore, reusable_length
from ..config import StoreConfig
from ..errors import AttnStoreError, RecordError
from ..record import LayerKV, SessionRecord, dtype_name, session_key
from .disk import DiskTier
from .dram import DramTier

log = logging.getLogger(__name__)

_COUNTERS = (
    "lookups", "hits", "hits_dram", "hits_disk", "misses", "partial_hits", "rejected_records",
    "reused_tokens", "prefilled_tokens", "saves", "dram_evictions", "disk_writes", "disk_write_errors",
    "disk_bytes_written", "disk_bytes_read", "load_seconds", "save_seconds",
)


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence ([T] or [1, T]), got shape {tuple(ids.shape)}; "
                         "keep one AttentionStoreCache per conversation")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty")
    return ids.long()


def _check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id must be a non-empty str, got {session_id!r}")
    return session_id


class AttentionStore:
    """Keeps every conversation's KV cache (pre-RoPE) in DRAM and on disk and restores it exactly.

    >>> store = AttentionStore(StoreConfig(dram_bytes="2GB", disk_dir="/tmp/kv"))
    >>> cache = store.cache_for(model, "alice", input_ids)
    >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    >>> store.save("alice", cache, out)
    """

    def __init__(self, config: StoreConfig | None = None):
        self.config = config or StoreConfig()
        self.namespace = self.config.namespace
        self.dram = DramTier(self.config.dram_bytes)
        self.disk = DiskTier(self.config.disk_dir, self.config.disk_bytes) if self.config.disk_dir else None
        self._pool = ThreadPoolExecutor(self.config.save_workers, thread_name_prefix="attnstore-save")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._stats = {k: 0 for k in _COUNTERS}
        self._closed = False

    # ---- lookup / restore -------------------------------------------------------------------------------
    def _key(self, session_id: str) -> str:
        return session_key(self.namespace, session_id)

    def _lookup(self, session_id: str) -> tuple[SessionRecord | None, str | None]:
        key = self._key(session_id)
        rec = self.dram.get(key)
        if rec is not None:
            return rec, "dram"
        if self.disk is None:
            return None, None
        data = self.disk.get_bytes(key)
        if data is None:
            return None, None
        self._count("disk_bytes_read", len(data))
        try:
            rec = SessionRecord.from_bytes(data, expect_namespace=self.namespace, expect_session=session_id)
        except RecordError as exc:
            log.warning("session %r: disk record rejected (%s); recomputing and replacing it", session_id, exc)
            self._count("rejected_records")
            self.disk.remove(key)
            return None, None
        self._put_dram(rec, from_disk=True)
        return rec, "disk"

    def cache_for(self, model, session_id: str, input_ids) -> AttentionStoreCache:
        """An :class:`AttentionStoreCache` for this turn, holding whatever of ``input_ids`` the store can restore.

        ``input_ids`` is the whole conversation so far (history + new message). Pass the same ids to
        ``model.generate(..., past_key_values=cache)``; only the tokens past ``cache.reused_tokens`` are prefilled.
        """
        self._check_open()
        session_id = _check_session_id(session_id)
        ids = _as_ids(input_ids)
        t0 = time.perf_counter()
        cache = AttentionStoreCache(model, session_id=session_id)
        cache.input_ids = ids
        fingerprint = cache._patch.fingerprint(model)
        self._count("lookups")
        rec, tier = self._lookup(session_id)
        reuse = 0
        if rec is not None:
            dtype = dtype_name(next(model.parameters()).dtype)
            if rec.fingerprint != fingerprint or rec.dtype != dtype:
                log.warning("session %r: stored record was written by another model or dtype (%s); recomputing",
                            session_id, rec.dtype)
                self._count("rejected_records")
            else:
                reuse = reusable_length(rec, cache, ids[0].tolist())
        if reuse > 0:
            restore(cache, model, rec, reuse, ids.shape[1])
            cache.prefix_ids = rec.token_ids[:reuse]
            cache.source = tier
            self._count("hits")
            self._count(f"hits_{tier}")
            if reuse < rec.num_tokens:
                self._count("partial_hits")
        else:
            self._count("misses")
        cache.load_seconds = time.perf_counter() - t0
        self._count("reused_tokens", reuse)
        self._count("prefilled_tokens", ids.shape[1] - reuse)
        self._count("load_seconds", cache.load_seconds)
        log.debug("session %r: %d tokens, %d restored from %s, %d to prefill (%.1f ms)", session_id,
                  ids.shape[1], reuse, tier or "-", ids.shape[1] - reuse, cache.load_seconds * 1e3)
        return cache

    # ---- save ---------------------------------------------------------------------------------------------
    def record_from_cache(self, session_id: str, cache: AttentionStoreCache, sequences) -> SessionRecord:
        """Snapshot ``cache`` (host copies of its pre-RoPE K/V) as a record of ``sequences``' tokens."""
        seq = _as_ids(sequences)[0].tolist()
        n = cache.get_seq_length()
        if n > len(seq):
            raise ValueError(f"the cache holds {n} tokens but sequences has only {len(seq)}: pass generate()'s output")
        if cache.prefix_ids and seq[: len(cache.prefix_ids)] != cache.prefix_ids:
            raise ValueError("sequences does not start with the tokens this cache restored: pass generate()'s output "
                             "for the same conversation")
        layers = []
        for (raw, values, start), work in zip(cache.raw_layers(), cache.layers):
            if raw.shape[0] != 1:
                raise ValueError(f"only batch size 1 can be saved as a session (cache batch is {raw.shape[0]})")
            kind = "sliding" if isinstance(work, SlidingLayer) else "full"
            layers.append(LayerKV(kind, start, raw.detach().to("cpu", copy=True), values.detach().to("cpu", copy=True)))
        dtype = dtype_name(layers[0].keys.dtype) if layers else "float32"
        fingerprint = cache._patch._fingerprint or ""
        # tokens past the cache (normally the last generated one) have no KV yet; kept so history() is complete
        return SessionRecord(self.namespace, session_id, fingerprint, dtype, seq[:n], layers,
                             meta={"tail_ids": seq[n:]})

    def save(self, session_id: str, cache: AttentionStoreCache, sequences) -> SessionRecord:
        """Store the conversation held by ``cache``. ``sequences`` is generate()'s output (prompt + reply).

        The last generated token has no KV yet (the next turn prefills it). The record goes to DRAM now and
        to disk in the background (write-through) or when evicted / at :meth:`close` (write-back).
        """
        self._check_open()
        session_id = _check_session_id(session_id)
        if not isinstance(cache, AttentionStoreCache):
            raise TypeError(f"save() needs an AttentionStoreCache (from store.cache_for), got {type(cache).__name__}")
        t0 = time.perf_counter()
        rec = self.record_from_cache(session_id, cache, sequences)
        self._put_dram(rec)
        if self.disk is not None and self.config.write_policy == "write_through":
            self._write_disk_async(rec)
        self._count("saves")
        self._count("save_seconds", time.perf_counter() - t0)
        return rec

    def _put_dram(self, rec: SessionRecord, from_disk: bool = False) -> None:
        for old in self.dram.put(rec):
            if old is rec and from_disk:
                continue  # too large for DRAM; it is on disk already
            self._count("dram_evictions")
            # write-through: every record is on disk (or on its way); write-back: demote it now
            if self.disk is not None and self.config.write_policy == "write_back":
                self._write_disk_async(old)

    def _write_disk_async(self, rec: SessionRecord) -> None:
        fut = self._pool.submit(self._write_disk, rec)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _write_disk(self, rec: SessionRecord) -> None:
        try:
            n = self.disk.put(rec)
        except OSError as exc:
            self._count("disk_write_errors")
            log.warning("session %r: could not write record to %s (%s); it stays in DRAM only",
                        rec.session_id, self.disk.dir, exc)
            return
        self._count("disk_writes")
        self._count("disk_bytes_written", n)

    def history(self, session_id: str) -> list[int] | None:
        """The full token ids of a stored conversation (what the next turn should extend), or ``None``."""
        rec, _ = self._lookup(_check_session_id(session_id))
        if rec is None:
            return None
        return rec.token_ids + [int(t) for t in rec.meta.get("tail_ids", [])]

    # ---- housekeeping ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every pending write has finished."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            for fut in pending:
                fut.result()

    def drop(self, session_id: str) -> None:
        """Forget a session in every tier."""
        key = self._key(_check_session_id(session_id))
        self.flush()
        self.dram.remove(key)
        if self.disk is not None:
            self.disk.remove(key)

    def close(self) -> None:
        """Flush, persist every DRAM record to disk (so a new process resumes every session), stop the workers."""
        if self._closed:
            return
        self.flush()
        if self.disk is not None:
            for key in self.dram.keys():
                rec = self.dram.get(key)
                if rec is not None and (self.config.write_policy == "write_back" or not self.disk.contains(key)):
                    self._write_disk(rec)
        self._pool.shutdown(wait=True)
        self._closed = True

    def __enter__(self) -> "AttentionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise AttnStoreError("this AttentionStore is closed; create a new one on the same disk_dir to resume")

    def _count(self, name: str, by=1) -> None:
        with self._lock:
            self._stats[name] += by

    def stats(self) -> dict:
        """Counters: lookups, hits by tier, misses, reused/prefilled tokens, bytes, evictions, times."""
        with self._lock:
            s = dict(self._stats)
        s["hit_rate"] = s["hits"] / s["lookups"] if s["lookups"] else 0.0
        s["dram_records"], s["dram_bytes"] = len(self.dram), self.dram.used
        if self.disk is not None:
            s["disk_records"], s["disk_bytes"] = len(self.disk), self.disk.used
        return s
