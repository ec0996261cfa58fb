"""The disk tier: one safetensors file per session, atomic writes, an index rebuilt from the directory on start."""

from __future__ import annotations

import fcntl
import json
import logging
import struct
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError
from ..record import SessionRecord
from .policy import LRUPolicy, Policy

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
#: the temporary files this tier writes (``<key>.<pid>.<thread>.tmp``): only these are ever removed, never a file
#: of someone else's that happens to end in .tmp
_OUR_TMP = re.compile(r"[0-9a-f]{64}\.[0-9]+(\.[0-9]+)?" + re.escape(TMP_SUFFIX))
QUARANTINE = "quarantine"
LOCK = ".lock"


class DiskTier:
    """contains / get / put / remove / prefetch over record files in ``directory``, bounded in bytes.

    The index (key -> file size) always equals the record files in the directory; sizes are the files' sizes.
    Several processes may share a directory: writes and evictions hold an advisory lock on ``.lock``, readers
    see whole files only (atomic rename), and a key missing from this process's index is looked up on disk.
    Rejected files are moved to ``quarantine/`` (kept for inspection, never read again).
    """

    name = "disk"

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int | None, policy: Policy | None = None,
                 fsync: bool = True, namespace: str | None = None):
        self.fsync = fsync
        self.namespace = namespace  # another namespace's records in the directory: not this tier's to count or evict
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"disk_dir {str(self.dir)!r} cannot be created: {exc}") from exc
        self.capacity = capacity_bytes
        self.policy = policy or LRUPolicy()
        self._lock = threading.RLock()
        self._index: dict[str, int] = {}
        self._gone: dict[str, tuple] = {}  # key -> identity of a file that could not be removed (read-only disk)
        self.used = 0
        self.evictions = 0
        self._rebuild_index()

    @contextmanager
    def _dir_lock(self):
        """Serialise writers across processes sharing the directory (advisory flock)."""
        with self._lock:
            try:
                fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # a read-only directory: nothing will be written here, reading needs no lock
                try:
                    fd = os.open(self.dir / LOCK, os.O_RDONLY)
                except OSError:
                    fd = None
            if fd is None:
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _rebuild_index(self) -> None:
        found = []
        with self._dir_lock():
            for p in self.dir.iterdir():
                if _OUR_TMP.fullmatch(p.name):  # a write interrupted by a crash: never a valid record
                    if self._stale_tmp(p):
                        try:
                            p.unlink()
                            log.info("removed leftover temporary file %s", p)
                        except OSError:
                            pass
                elif p.name.endswith(SUFFIX) and len(p.name) == 64 + len(SUFFIX):
                    key = p.name[: -len(SUFFIX)]
                    if self.namespace is not None:
                        head = self.read_header(key)  # unreadable: indexed (quarantined when looked up)
                        if head is not None and head.get("namespace") != self.namespace:
                            continue  # another tenant's, sharing the directory
                    try:
                        st = p.stat()
                    except OSError:  # removed meanwhile by another process, or a dangling link
                        continue
                    found.append((st.st_mtime, key, st.st_size))
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

    @staticmethod
    def _stale_tmp(p: Path) -> bool:
        """A temp file whose writer is gone (another live process may be writing it right now)."""
        parts = p.name.split(".")
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            return True
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return time.time() - p.stat().st_mtime > 3600

    def contains(self, key: str) -> bool:
        if key in self._index:
            return True
        return self._discover(key)

    def _discover(self, key: str) -> bool:
        """Pick up a record another process sharing the directory has committed."""
        try:
            st = self.path(key).stat()
        except OSError:
            return False
        if self._gone.get(key) == _identity(st):
            return False
        size = st.st_size
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self.used += size
        self.policy.on_insert(key, self.name)
        return True

    def _read(self, key: str, touch: bool, reader):
        """``reader(path)`` of a record file this tier holds, or ``None`` (absent, or gone under us)."""
        if not self.contains(key):
            return None
        try:
            out = reader(self.path(key))
        except FileNotFoundError:
            self._drop_index(key)
            return None
        except OSError as exc:  # not ours to read (permissions), a directory, disk_dir replaced: a miss
            log.warning("disk tier: cannot read %s (%s); treating it as a miss", self.path(key), exc)
            return None
        if touch:
            self.policy.touch(key)
        return out

    def get_bytes(self, key: str, touch: bool = True) -> bytes | None:
        """Raw bytes of a record file (decoding and verification are the caller's)."""
        return self._read(key, touch, Path.read_bytes)

    def open_lazy(self, key: str, touch: bool = True, **expect):
        """Open a record for a layer-wise restore: header verified now, tensors read and verified per layer
        (:class:`~attnstore_hf.record.LazyRecord`). ``None`` if absent; :class:`RecordError` if the header is bad."""
        from ..record import LazyRecord

        return self._read(key, touch, lambda path: LazyRecord(path, **expect))

    def read_header(self, key: str) -> dict | None:
        """The JSON header of a record file (unverified; for listings), or ``None`` if unreadable."""
        try:
            with open(self.path(key), "rb") as f:
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > 1 << 28:
                    return None
                meta = json.loads(f.read(hlen)).get("__metadata__") or {}
            head = json.loads(meta["attnstore"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
            return None
        return head if isinstance(head, dict) else None

    def get(self, key: str, **expect) -> SessionRecord | None:
        """Decode and verify a record (raises :class:`RecordError` on a bad file)."""
        data = self.get_bytes(key)
        return None if data is None else SessionRecord.from_bytes(data, **expect)

    def prefetch(self, key: str, **expect) -> SessionRecord | None:
        data = self.get_bytes(key, touch=False)
        return None if data is None else SessionRecord.from_bytes(data, **expect)

    def put(self, record: SessionRecord, data: bytes | None = None, protect=frozenset(), first=frozenset()) -> int:
        """Write ``record`` atomically (temp file, fsync, rename), evicting by policy to stay in capacity.

        ``first``: keys whose files go before any other when room is needed (copies a tier above supersedes),
        ``protect``: keys that go last. Returns bytes written. Raises ``OSError`` (full disk, ...); nothing
        half-written is left behind.
        """
        chunks, size = record.encode_chunks() if data is None else ([data], len(data))
        key = record.key
        if self.capacity is not None and size > self.capacity:
            raise OSError(28, f"record of {size} bytes exceeds the disk tier capacity ({self.capacity})")
        with self._dir_lock():
            self._make_room(size, keep=key, protect=protect, first=first)
            self._write_file(key, chunks)
        self.policy.on_insert(key, self.name)  # a demotion is not a use: the store touches on use
        return size

    def _write_file(self, key: str, chunks: list) -> None:
        """Write the buffers ``chunks`` as the record file of ``key``, atomically."""
        final = self.path(key)
        tmp = self.dir / f"{key}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        size = sum(memoryview(c).nbytes for c in chunks)
        try:
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
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
            self.used += size - self._index.get(key, 0)
            self._index[key] = size

    def _make_room(self, size: int, keep: str, protect=frozenset(), first=frozenset()) -> None:
        if self.capacity is None:
            return
        used = self.used - self._index.get(keep, 0)
        if used + size <= self.capacity:
            return
        order = self.policy.eviction_order([k for k in self._index if k != keep], self.name)
        order = ([k for k in order if k in first] + [k for k in order if k not in protect and k not in first]
                 + [k for k in order if k in protect and k not in first])
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
        except OSError as exc:  # a read-only disk: the file stays, but this store no longer counts or serves it
            log.warning("disk tier: cannot remove %s (%s); ignoring it from now on", self.path(key), exc)
            self._ignore(key)
        self.policy.on_remove(key, self.name)
        return had

    def _ignore(self, key: str) -> None:
        """A file this tier could not remove: not picked up again (:meth:`_discover`) unless rewritten."""
        try:
            self._gone[key] = _identity(self.path(key).stat())
        except OSError:
            pass

    def quarantine(self, key: str, reason: str = "") -> Path | None:
        """Move a rejected record file out of the way (``quarantine/<key>.<time>.bad``); it is never read again."""
        self._drop_index(key)
        self.policy.on_remove(key, self.name)
        qdir = self.dir / QUARANTINE
        try:
            qdir.mkdir(exist_ok=True)
            dest = qdir / f"{key}.{time.time_ns()}.bad"
            os.replace(self.path(key), dest)
            log.info("quarantined %s (%s)", dest, reason)
            return dest
        except FileNotFoundError:
            return None
        except OSError:  # cannot move it (full disk, permissions): at least never read it again
            try:
                self.path(key).unlink()
            except OSError:
                self._ignore(key)
            return None


def _identity(st: os.stat_result) -> tuple:
    """What tells one file at a path from the next one written there (a rename gives a new inode)."""
    return st.st_ino, st.st_mtime_ns, st.st_size
