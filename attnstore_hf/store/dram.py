"""The host-memory tier: records kept as CPU tensors, bounded in bytes, least recently used evicted first."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..record import SessionRecord


class DramTier:
    """contains / get / put / remove over ``SessionRecord`` objects with exact byte accounting."""

    name = "dram"

    def __init__(self, capacity_bytes: int | None):
        self.capacity = capacity_bytes
        self.used = 0
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
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
                self._records.move_to_end(key)
            return rec

    def put(self, record: SessionRecord) -> list[SessionRecord]:
        """Insert (or replace) ``record``; returns the records evicted to make room (oldest use first).

        A record larger than the whole tier is not kept (returned as evicted itself).
        """
        with self._lock:
            self.remove(record.key)
            size = record.nbytes
            if self.capacity is not None and size > self.capacity:
                return [record]
            evicted = []
            while self.capacity is not None and self.used + size > self.capacity and self._records:
                _, old = self._records.popitem(last=False)
                self.used -= old.nbytes
                evicted.append(old)
            self._records[record.key] = record
            self.used += size
            return evicted

    def remove(self, key: str) -> SessionRecord | None:
        with self._lock:
            rec = self._records.pop(key, None)
            if rec is not None:
                self.used -= rec.nbytes
            return rec
