"""The host-memory tier: records as CPU tensors (pinned when CUDA is present), bounded in bytes."""

from __future__ import annotations

import threading

import torch

from ..record import LayerKV, SessionRecord
from .policy import LRUPolicy, Policy


def pin_record(record: SessionRecord) -> SessionRecord:
    """Move a record's tensors to page-locked host memory (fast, asynchronous host-to-device copies)."""
    if not torch.cuda.is_available():
        return record
    def pin(t):
        return t if t is None or t.is_pinned() else t.pin_memory()

    record.layers = [LayerKV(lay.kind, lay.start, pin(lay.keys), pin(lay.values), pin(lay.k_scale), pin(lay.v_scale))
                     for lay in record.layers]
    return record


class DramTier:
    """contains / get / put / remove / prefetch over ``SessionRecord`` objects, with exact byte accounting.

    When full, records leave in the order the policy gives; records whose keys are in ``protect`` leave only if
    nothing else can.
    """

    name = "dram"

    def __init__(self, capacity_bytes: int | None, policy: Policy | None = None, pin: bool = True):
        self.capacity = capacity_bytes
        self.policy = policy or LRUPolicy()
        self.pin = pin
        self.used = 0
        self._records: dict[str, SessionRecord] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def contains(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> SessionRecord | None:
        with self._lock:
            rec = self._records.get(key)
        if rec is not None:
            self.policy.touch(key)
        return rec

    def peek(self, key: str) -> SessionRecord | None:
        """Like ``get`` without counting as a use."""
        return self._records.get(key)

    def prefetch(self, key: str) -> SessionRecord | None:
        return self.peek(key)

    def fits(self, size: int, protect=frozenset(), replacing: str | None = None) -> bool:
        """Whether ``size`` bytes can be made room for without evicting a protected record."""
        if self.capacity is None:
            return True
        with self._lock:
            free = self.capacity - self.used + (self._records[replacing].nbytes if replacing in self._records else 0)
            evictable = sum(r.nbytes for k, r in self._records.items() if k not in protect and k != replacing)
            return size <= free + evictable

    def put(self, record: SessionRecord, protect=frozenset(), yield_to_protected: bool = False
            ) -> list[SessionRecord]:
        """Insert (or replace) ``record``; returns the records evicted to make room (in the policy's order; keys
        in ``protect`` only if nothing else is left). A record larger than the whole tier is not kept (it is
        returned as evicted itself); so is one not in ``protect`` that would push a protected one out, if
        ``yield_to_protected`` (a tier below takes it).
        """
        if self.pin:
            record = pin_record(record)
        size = record.nbytes
        with self._lock:
            self.remove(record.key, _forget=False)
            if self.capacity is not None and size > self.capacity:
                return [record]
            if yield_to_protected and record.key not in protect and not self.fits(size, protect):
                return [record]
            evicted = []
            if self.capacity is not None and self.used + size > self.capacity:
                order = self.policy.eviction_order(self._records.keys(), self.name)
                order = [k for k in order if k not in protect] + [k for k in order if k in protect]
                for k in order:
                    if self.used + size <= self.capacity:
                        break
                    evicted.append(self.remove(k))
            self._records[record.key] = record
            self.used += size
        self.policy.on_insert(record.key, self.name)  # placement, not a use: the store touches on use
        return evicted

    def remove(self, key: str, _forget: bool = True) -> SessionRecord | None:
        with self._lock:
            rec = self._records.pop(key, None)
            if rec is not None:
                self.used -= rec.nbytes
        if rec is not None and _forget:
            self.policy.on_remove(key, self.name)
        return rec
