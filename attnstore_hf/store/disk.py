"""The disk tier: one safetensors file per session, atomic writes, an index rebuilt from the directory on start."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..record import SessionRecord

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"


class DiskTier:
    """contains / get / put / remove over record files in ``directory``, bounded by ``capacity_bytes``."""

    name = "disk"

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int | None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self._lock = threading.RLock()
        self._index: dict[str, tuple[int, float]] = {}  # key -> (bytes, last use)
        self._rebuild_index()

    def _rebuild_index(self) -> None:
        for p in self.dir.iterdir():
            if p.name.endswith(TMP_SUFFIX):  # a write interrupted by a crash: never a valid record
                try:
                    p.unlink()
                    log.info("removed leftover temporary file %s", p)
                except OSError:
                    pass
            elif p.name.endswith(SUFFIX) and len(p.name) == 64 + len(SUFFIX):
                st = p.stat()
                self._index[p.name[: -len(SUFFIX)]] = (st.st_size, st.st_mtime)

    @property
    def used(self) -> int:
        return sum(size for size, _ in self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def contains(self, key: str) -> bool:
        return key in self._index

    def get_bytes(self, key: str) -> bytes | None:
        """Raw bytes of a record file (decoding and verification are the caller's)."""
        with self._lock:
            if key not in self._index:
                return None
            size, _ = self._index[key]
            self._index[key] = (size, time.time())
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._index.pop(key, None)
            return None

    def put(self, record: SessionRecord, data: bytes | None = None) -> int:
        """Write ``record`` atomically (temp file, fsync, rename). Returns bytes written. Raises ``OSError``."""
        data = record.to_bytes() if data is None else data
        key = record.key
        with self._lock:
            self._make_room(len(data), keep=key)
        final = self.path(key)
        tmp = self.dir / f"{key}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        try:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        with self._lock:
            self._index[key] = (len(data), time.time())
        return len(data)

    def _make_room(self, size: int, keep: str) -> None:
        if self.capacity is None:
            return
        used = sum(s for k, (s, _) in self._index.items() if k != keep)
        for key, (s, _) in sorted(self._index.items(), key=lambda kv: kv[1][1]):
            if used + size <= self.capacity:
                break
            if key == keep:
                continue
            self.remove(key)
            used -= s
            log.debug("disk tier evicted %s (%d bytes)", key, s)

    def remove(self, key: str) -> bool:
        with self._lock:
            had = self._index.pop(key, None) is not None
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        return had
