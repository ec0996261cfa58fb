"""The shared Redis tier: records as size-bounded chunks plus a manifest written last; faults become misses."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class RedisUnavailable(Exception):
    """Redis could not be reached (down, timeout, restarting); the store treats it as a miss."""


class RedisTier:
    """contains / get / put / remove over record bytes in Redis (standalone or Cluster).

    Keys carry the namespace, the model fingerprint and the session key; every key of one record shares the
    hash tag ``{fp:session}`` so a Cluster keeps them in one slot. A record is written as chunks under a fresh
    write id, then the manifest naming that write id: a reader follows the manifest, so it sees the old record
    or the new one, never half of one. After a failure the tier backs off for ``retry_s`` before trying again.
    """

    name = "redis"

    def __init__(self, url: str, *, namespace: str = "default", chunk_bytes: int = 4 << 20,
                 ttl_seconds: float | None = None, timeout_s: float = 1.0, retry_s: float = 2.0):
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the Redis tier needs the 'redis' package: pip install 'attnstore-hf[redis]'") from exc
        self._redis = redis
        self.url = url
        self.namespace = re.sub(r"[^A-Za-z0-9_.-]", "_", namespace)[:64]
        self.chunk_bytes = int(chunk_bytes)
        self.ttl = None if ttl_seconds is None else max(1, int(ttl_seconds))
        self.retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        kw = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False)
        if url.startswith("redis+cluster://") or url.startswith("rediss+cluster://"):
            from redis.cluster import RedisCluster

            self.client = RedisCluster.from_url(url.replace("+cluster", ""), **kw)
        else:
            self.client = redis.Redis.from_url(url, health_check_interval=30, **kw)
        self.errors = 0

    # ---- keys ----------------------------------------------------------------------------------------------
    def _base(self, key: str, fingerprint: str) -> str:
        return f"attnstore:{self.namespace}:{{{fingerprint[:16]}:{key}}}"

    def _call(self, fn):
        if time.monotonic() < self._down_until:
            raise RedisUnavailable(f"Redis at {self.url} failed recently; retrying after a short back-off")
        try:
            return fn()
        except (self._redis.exceptions.ConnectionError, self._redis.exceptions.TimeoutError,
                self._redis.exceptions.ResponseError, OSError) as exc:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_s
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def available(self) -> bool:
        try:
            return bool(self._call(self.client.ping))
        except RedisUnavailable:
            return False

    # ---- interface ---------------------------------------------------------------------------------------
    def contains(self, key: str, fingerprint: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._base(key, fingerprint) + ":m")))

    def get_bytes(self, key: str, fingerprint: str) -> bytes | None:
        """The record's bytes, or ``None`` if absent. Raises :class:`RedisUnavailable`."""
        base = self._base(key, fingerprint)
        raw = self._call(lambda: self.client.get(base + ":m"))
        if raw is None:
            return None
        try:
            man = json.loads(raw)
            if man.get("v") != MANIFEST_VERSION:
                return None
            wid, n = man["w"], int(man["n"])
        except (ValueError, KeyError, TypeError):
            return None

        def fetch():
            pipe = self.client.pipeline(transaction=False)
            for i in range(n):
                pipe.get(f"{base}:{wid}:{i}")
            return pipe.execute()

        chunks = self._call(fetch)
        if any(c is None for c in chunks):
            return None  # chunks expired or evicted by Redis: a miss
        data = b"".join(chunks)
        if len(data) != man.get("size") or hashlib.sha256(data).hexdigest() != man.get("sha256"):
            return None
        return data

    def head(self, key: str, fingerprint: str) -> dict | None:
        """What the shared record's manifest says of it (one round trip): ``tokens`` it holds and the
        conversation's ``turn`` it was saved at (``None`` for a record written before turns were counted), or
        ``None`` if there is none."""
        raw = self._call(lambda: self.client.get(self._base(key, fingerprint) + ":m"))
        if raw is None:
            return None
        try:
            man = json.loads(raw)
            turn = man.get("turn")
            return {"tokens": int(man.get("tokens", -1)), "turn": None if turn is None else int(turn)}
        except (ValueError, TypeError, AttributeError):
            return None

    def put_bytes(self, key: str, fingerprint: str, data: bytes, tokens: int = -1, turn: int | None = None) -> int:
        """Write chunks, then the manifest; delete the previous write's chunks. Raises :class:`RedisUnavailable`."""
        base = self._base(key, fingerprint)
        wid = uuid.uuid4().hex[:12]
        n = max(1, -(-len(data) // self.chunk_bytes))
        man = json.dumps({"v": MANIFEST_VERSION, "w": wid, "n": n, "size": len(data), "tokens": tokens,
                          "turn": turn, "sha256": hashlib.sha256(data).hexdigest(), "t": time.time()})

        def write():
            old = self.client.get(base + ":m")
            pipe = self.client.pipeline(transaction=False)
            for i in range(n):
                pipe.set(f"{base}:{wid}:{i}", data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes], ex=self.ttl)
            pipe.execute()
            self.client.set(base + ":m", man, ex=self.ttl)  # the commit point
            if old is not None:
                try:
                    o = json.loads(old)
                    self.client.delete(*[f"{base}:{o['w']}:{i}" for i in range(int(o["n"]))])
                except (ValueError, KeyError, TypeError):
                    pass

        self._call(write)
        return len(data)

    def remove(self, key: str, fingerprint: str) -> None:
        base = self._base(key, fingerprint)

        def rm():
            old = self.client.get(base + ":m")
            self.client.delete(base + ":m")
            if old is not None:
                o = json.loads(old)
                self.client.delete(*[f"{base}:{o['w']}:{i}" for i in range(int(o["n"]))])

        self._call(rm)
