"""The disk tier: one safetensors file per session, atomic writes, an index rebuilt from the directory on start."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..record import SessionRecord
from .policy import LRUPolicy, Policy

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"


class DiskTier:
    """contains / get / put / remove / prefetch over record files in ``directory``, bounded in bytes.

    The index (key -> file size) always equals the record files in the directory; sizes are the files' sizes.
    """

    name = "disk"

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int | None, policy: Policy | None = None,
                 fsync: bool = True):
        self.fsync = fsync
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self.policy = policy or LRUPolicy()
        self._lock = threading.RLock()
        self._index: dict[str, int] = {}
        self.used = 0
        self.evictions = 0
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        found = []
        for p in self.dir.iterdir():
            if p.name.endswith(TMP_SUFFIX):  # a write interrupted by a crash: never a valid record
                try:
                    p.unlink()
                    log.info("removed leftover temporary file %s", p)
                except OSError:
                    pass
            elif p.name.endswith(SUFFIX) and len(p.name) == 64 + len(SUFFIX):
                st = p.stat()
                found.append((st.st_mtime, p.name[: -len(SUFFIX)], st.st_size))
        for _, key, size in sorted(found):  # oldest first, so LRU/FIFO start from file age
            self._index[key] = size
            self.used += size
            self.policy.on_insert(key, self.name)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def contains(self, key: str) -> bool:
        return key in self._index

    def get_bytes(self, key: str, touch: bool = True) -> bytes | None:
        """Raw bytes of a record file (decoding and verification are the caller's)."""
        if key not in self._index:
            return None
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            self._drop_index(key)
            return None
        if touch:
            self.policy.touch(key)
        return data

    def get(self, key: str, **expect) -> SessionRecord | None:
        """Decode and verify a record (raises :class:`RecordError` on a bad file)."""
        data = self.get_bytes(key)
        return None if data is None else SessionRecord.from_bytes(data, **expect)

    def prefetch(self, key: str, **expect) -> SessionRecord | None:
        data = self.get_bytes(key, touch=False)
        return None if data is None else SessionRecord.from_bytes(data, **expect)

    def put(self, record: SessionRecord, data: bytes | None = None, protect=frozenset()) -> int:
        """Write ``record`` atomically (temp file, fsync, rename), evicting by policy to stay in capacity.

        Returns bytes written. Raises ``OSError`` (full disk, ...); nothing half-written is left behind.
        """
        data = record.to_bytes() if data is None else data
        key = record.key
        if self.capacity is not None and len(data) > self.capacity:
            raise OSError(28, f"record of {len(data)} bytes exceeds the disk tier capacity ({self.capacity})")
        with self._lock:
            self._make_room(len(data), keep=key, protect=protect)
        final = self.path(key)
        tmp = self.dir / f"{key}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        if self.fsync:
            try:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        with self._lock:
            self.used += len(data) - self._index.get(key, 0)
            self._index[key] = len(data)
        self.policy.on_insert(key, self.name)  # a demotion is not a use: the store touches on use
        return len(data)

    def _make_room(self, size: int, keep: str, protect=frozenset()) -> None:
        if self.capacity is None:
            return
        used = self.used - self._index.get(keep, 0)
        if used + size <= self.capacity:
            return
        order = self.policy.eviction_order([k for k in self._index if k != keep], self.name)
        order = [k for k in order if k not in protect] + [k for k in order if k in protect]
        for key in order:
            if used + size <= self.capacity:
                break
            used -= self._index.get(key, 0)
            self.remove(key)
            self.evictions += 1
            log.debug("disk tier dropped %s", key)

    def _drop_index(self, key: str) -> bool:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self.used -= size
        return size is not None

    def remove(self, key: str) -> bool:
        had = self._drop_index(key)
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        self.policy.on_remove(key, self.name)
        return had
