"""Eviction and prefetch policies, apart from the tiers: ``lru``, ``fifo`` and scheduler-aware ``scheduler``."""

from __future__ import annotations

import itertools
import threading

from ..errors import ConfigError


class Policy:
    """Orders a tier's records for eviction. Tiers report what happens; the policy only ranks.

    ``eviction_order(keys, tier)`` returns the keys of ``tier`` in the order they should leave it (first = first
    to go). Bookkeeping uses a logical clock, so orders are deterministic.
    """

    name = "base"

    def __init__(self):
        self._lock = threading.Lock()
        self._tick = itertools.count()
        self.last_access: dict[str, int] = {}
        self.inserted: dict[tuple[str, str], int] = {}

    def touch(self, key: str) -> None:
        """``key`` was read or written."""
        with self._lock:
            self.last_access[key] = next(self._tick)

    def on_insert(self, key: str, tier: str) -> None:
        """``key`` was written into ``tier`` (a new record, an updated one, a promotion or a demotion).

        The insertion time is kept while the key stays in the tier: an update in place keeps its FIFO position.
        """
        with self._lock:
            self.inserted.setdefault((tier, key), next(self._tick))
            self.last_access.setdefault(key, next(self._tick))

    def on_remove(self, key: str, tier: str) -> None:
        with self._lock:
            self.inserted.pop((tier, key), None)

    def forget(self, key: str) -> None:
        with self._lock:
            self.last_access.pop(key, None)
            for tier in ("dram", "disk"):
                self.inserted.pop((tier, key), None)

    def forget_unplaced(self, absent) -> None:
        """Forget the access times of the keys in no tier for which ``absent(key)`` is true (the store trims what it
        keeps of sessions it no longer holds)."""
        with self._lock:
            placed = {key for _, key in self.inserted}
            for key in [k for k in self.last_access if k not in placed and absent(k)]:
                del self.last_access[key]

    def plan(self, queue: list[str]) -> None:
        """The serving queue's look-ahead (keys, head first). Ignored by queue-blind policies."""

    def queue_position(self, key: str) -> int | None:
        return None

    def _lru(self, keys) -> list[str]:
        return sorted(keys, key=lambda k: self.last_access.get(k, -1))

    def eviction_order(self, keys, tier: str) -> list[str]:
        raise NotImplementedError


class LRUPolicy(Policy):
    """Least recently used (read or written) leaves first."""

    name = "lru"

    def eviction_order(self, keys, tier: str) -> list[str]:
        with self._lock:
            return self._lru(keys)


class FIFOPolicy(Policy):
    """First into the tier leaves first (textbook FIFO): neither reads nor in-place updates renew a record; a
    record that left the tier and comes back (promotion, demotion) is a new arrival."""

    name = "fifo"

    def eviction_order(self, keys, tier: str) -> list[str]:
        with self._lock:
            return sorted(keys, key=lambda k: self.inserted.get((tier, k), -1))


class SchedulerPolicy(Policy):
    """Scheduler-aware (CachedAttention §3.3): the queue says what comes next.

    Sessions not in the queue leave first (least recently used first); then queued sessions, furthest from the
    head first. So a session near the head of the queue is the last to be demoted from DRAM or dropped from disk.
    """

    name = "scheduler"

    def __init__(self):
        super().__init__()
        self.positions: dict[str, int] = {}
        self.queue: list[str] = []

    def plan(self, queue: list[str]) -> None:
        with self._lock:
            self.queue = list(queue)
            self.positions = {}
            for i, k in enumerate(self.queue):
                self.positions.setdefault(k, i)

    def queue_position(self, key: str) -> int | None:
        return self.positions.get(key)

    def eviction_order(self, keys, tier: str) -> list[str]:
        with self._lock:
            keys = list(keys)
            idle = self._lru([k for k in keys if k not in self.positions])
            queued = sorted((k for k in keys if k in self.positions), key=lambda k: -self.positions[k])
            return idle + queued


POLICIES = {"lru": LRUPolicy, "fifo": FIFOPolicy, "scheduler": SchedulerPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ConfigError(f"policy must be one of {sorted(POLICIES)}, got {name!r}") from None
