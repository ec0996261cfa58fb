"""The shared Redis tier: records as size-bounded chunks plus a manifest written last; faults become misses."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
BATCH = 64                # chunks read or deleted per round trip: a manifest's claims never size one pipeline
PENDING_TTL_S = 3600      # chunks of a write not committed yet expire unless the manifest commits them


class RedisUnavailable(Exception):
    """Redis could not be reached (down, timeout, restarting), or refused a command; the store treats it as a
    miss."""


def redact(url: str) -> str:
    """``url`` without its user name and password (for messages and logs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))
    except ValueError:
        return "<redis url>"


def _manifest(raw) -> dict | None:
    """A manifest's fields once checked (``w`` write id, ``n`` chunks, ``size``), or ``None`` (absent, garbage, of
    another version): what a reader cannot trust is a miss, never an exception or a huge loop."""
    if raw is None:
        return None
    try:
        man = json.loads(raw)
        if not isinstance(man, dict) or man.get("v") != MANIFEST_VERSION:
            return None
        wid, n, size = man["w"], int(man["n"]), int(man["size"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(wid, str) or not re.fullmatch(r"[0-9a-f]{1,32}", wid) or not 1 <= n <= max(1, size):
        return None
    return {**man, "n": n, "size": size}


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
        self.shown_url = redact(url)  # the password stays out of logs
        self.namespace = re.sub(r"[^A-Za-z0-9_.-]", "_", namespace)[:64]
        self.chunk_bytes = int(chunk_bytes)
        self.ttl = None if ttl_seconds is None else max(1, int(ttl_seconds))
        self.retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._kw = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False)
        self._client = None
        if not url.startswith(("redis+cluster://", "rediss+cluster://")):
            # connects on first use; a Cluster client connects when made: made on first use (inside _call)
            self._client = redis.Redis.from_url(url, health_check_interval=30, **self._kw)
        self.errors = 0

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from redis.cluster import RedisCluster

                    self._client = RedisCluster.from_url(self.url.replace("+cluster", ""), **self._kw)
        return self._client

    # ---- keys ----------------------------------------------------------------------------------------------
    def _base(self, key: str, fingerprint: str) -> str:
        return f"attnstore:{self.namespace}:{{{fingerprint[:16]}:{key}}}"

    def _call(self, fn, *, now: bool = False):
        """``fn()``; a failure becomes :class:`RedisUnavailable`. The server down, slow, full or refusing (any error
        but one about a key's type) puts the tier off for ``retry_s`` (``now``: tried all the same); a key of the
        wrong type is that key's problem (the caller replaces or ignores it), not every session's."""
        if not now and time.monotonic() < self._down_until:
            raise RedisUnavailable(f"Redis at {self.shown_url} failed recently; retrying after a short back-off")
        exceptions = self._redis.exceptions
        try:
            return fn()
        except Exception as exc:
            if not isinstance(exc, (exceptions.RedisError, OSError)) and not _is_cluster_error(exc):
                raise  # a bug of ours, not Redis failing
            self.errors += 1
            if not _wrong_type(exc):
                self._down_until = time.monotonic() + self.retry_s
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def unavailable_reason(self) -> str | None:
        """``None`` if the server answers a PING, else why not (the exception, e.g. a refused connection or
        ``AuthenticationError`` for a missing or wrong password; never the password itself)."""
        try:
            return None if self._call(lambda: self.client.ping()) else "PING was not answered"
        except RedisUnavailable as exc:
            return str(exc)

    # ---- interface ---------------------------------------------------------------------------------------
    def contains(self, key: str, fingerprint: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._base(key, fingerprint) + ":m")))

    def _get_manifest(self, base: str) -> dict | None:
        """The manifest at ``base`` (checked), or ``None``; a manifest key of another type is a miss."""
        try:
            raw = self._call(lambda: self.client.get(base + ":m"))
        except RedisUnavailable as exc:
            if _wrong_type(exc.__cause__):
                log.warning("Redis: the key %s:m is not a record manifest (another type); treated as absent", base)
                return None
            raise
        return _manifest(raw)

    def get_bytes(self, key: str, fingerprint: str) -> bytes | None:
        """The record's bytes, or ``None`` if absent. Raises :class:`RedisUnavailable`."""
        base = self._base(key, fingerprint)
        man = self._get_manifest(base)
        if man is None:
            return None
        wid, n, size = man["w"], man["n"], man["size"]
        chunks, got = [], 0
        for names in _chunk_batches(base, wid, n):  # what the manifest claims costs nothing until they are there

            def fetch(names=names):
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.get(name)
                return pipe.execute()

            part = self._call(fetch)
            if any(c is None or isinstance(c, Exception) for c in part):
                return None  # chunks expired or evicted by Redis, or never there: a miss
            got += sum(len(c) for c in part)
            if got > size:
                return None
            chunks += part
        data = b"".join(chunks)
        if len(data) != size or hashlib.sha256(data).hexdigest() != man.get("sha256"):
            return None
        return data

    def head(self, key: str, fingerprint: str) -> dict | None:
        """What the shared record's manifest says of it (one round trip): ``tokens`` it holds and the
        conversation's ``turn`` it was saved at (``None`` for a record written before turns were counted), or
        ``None`` if there is none."""
        man = self._get_manifest(self._base(key, fingerprint))
        if man is None:
            return None
        try:
            turn = man.get("turn")
            return {"tokens": int(man.get("tokens", -1)), "turn": None if turn is None else int(turn)}
        except (ValueError, TypeError):
            return None

    def put_bytes(self, key: str, fingerprint: str, data: bytes, tokens: int = -1, turn: int | None = None) -> int:
        """Write chunks, then the manifest; delete the previous write's chunks. Raises :class:`RedisUnavailable`."""
        base = self._base(key, fingerprint)
        wid = uuid.uuid4().hex[:12]
        n = max(1, -(-len(data) // self.chunk_bytes))
        man = json.dumps({"v": MANIFEST_VERSION, "w": wid, "n": n, "size": len(data), "tokens": tokens,
                          "turn": turn, "sha256": hashlib.sha256(data).hexdigest(), "t": time.time()})

        # until the manifest commits them the chunks expire on their own: a write that fails half-way (the server
        # full, killed, a timeout) leaves nothing behind for good
        pending = self.ttl if self.ttl is not None and self.ttl <= PENDING_TTL_S else PENDING_TTL_S

        def upload():
            pipe = self.client.pipeline(transaction=False)
            for i in range(n):
                pipe.set(f"{base}:{wid}:{i}", data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes], ex=pending)
            pipe.execute()

        try:
            self._call(upload)
        except RedisUnavailable:
            try:  # best effort, at once (a full server still deletes; a dead one cannot): else they expire
                self._call(lambda: self._delete_chunks(base, wid, n), now=True)
            except RedisUnavailable:
                pass
            raise
        # the commit point. The manifest it replaces comes back atomically (SET ... GET): another replica may
        # have committed since this write began, and the chunks to delete are those of the one replaced
        replaced = self._swap_manifest(base, man)
        if self.ttl != pending:  # the record's own expiry (or none) from now on
            try:
                self._call(lambda: self._keep_chunks(base, wid, n), now=True)
            except RedisUnavailable as exc:  # committed; it expires with the pending TTL, manifest and all
                log.warning("Redis: a record was published but keeps a %d s expiry (%s)", pending, exc)
                try:
                    self._call(lambda: self.client.expire(base + ":m", pending), now=True)
                except RedisUnavailable:
                    pass
        if replaced is not None and replaced["w"] != wid:
            try:
                self._call(lambda: self._delete_chunks(base, replaced["w"], replaced["n"]), now=True)
            except RedisUnavailable as exc:  # published all the same; the old write's chunks stay behind
                log.warning("Redis: could not delete a replaced record's chunks (%s)", exc)
        return len(data)

    def _swap_manifest(self, base: str, man: str | None) -> dict | None:
        """Set the manifest at ``base`` to ``man`` (``None``: delete it) and return the one it replaced (checked;
        ``None`` if absent or garbage), in one atomic command (SET ... GET, GETDEL: Redis 6.2+). A key of another
        type there is deleted first: it would refuse every write and drop of the session."""
        op = ((lambda: self.client.getdel(base + ":m")) if man is None
              else (lambda: self.client.set(base + ":m", man, ex=self.ttl, get=True)))
        try:
            return _manifest(self._call(op))
        except RedisUnavailable as exc:
            if not _wrong_type(exc.__cause__):
                raise
        self._call(lambda: self.client.delete(base + ":m"))
        return _manifest(self._call(op))

    def _keep_chunks(self, base: str, wid: str, n: int) -> None:
        """Give a committed write's chunks the record's expiry (none: ``PERSIST``) in place of the pending one."""
        for names in _chunk_batches(base, wid, n):
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                if self.ttl is None:
                    pipe.persist(name)
                else:
                    pipe.expire(name, self.ttl)
            pipe.execute()

    def _delete_chunks(self, base: str, wid: str, n: int) -> None:
        """Delete the chunks of write ``wid``, a batch per round trip, stopping at a batch none of which was
        there (chunks are numbered from 0: a manifest claiming millions costs one round trip)."""
        for names in _chunk_batches(base, wid, n):
            if not self.client.delete(*names):
                return

    def remove(self, key: str, fingerprint: str) -> None:
        base = self._base(key, fingerprint)
        old = self._swap_manifest(base, None)
        if old is not None:
            self._call(lambda: self._delete_chunks(base, old["w"], old["n"]))


def _chunk_batches(base: str, wid: str, n: int):
    """The key names of write ``wid``'s ``n`` chunks, ``BATCH`` at a time (one round trip each)."""
    for lo in range(0, n, BATCH):
        yield [f"{base}:{wid}:{i}" for i in range(lo, min(n, lo + BATCH))]


def _wrong_type(exc) -> bool:
    return exc is not None and "WRONGTYPE" in str(exc)


def _is_cluster_error(exc) -> bool:
    try:
        from redis.exceptions import RedisClusterException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, RedisClusterException)
