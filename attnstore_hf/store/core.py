"""AttentionStore: looks sessions up across DRAM and disk, restores them into caches, saves them back."""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from ..cache import AttentionStoreCache, SlidingLayer, _device_dtype, restore, reusable_length
from ..config import StoreConfig
from ..errors import AttnStoreError, RecordError
from ..pipeline.cost import CostModel
from ..pipeline.saver import Snapshot, prompt_views
from ..record import LayerKV, SessionRecord, _check_head, dtype_name, session_key, transcode
from .disk import DiskTier
from .dram import DramTier
from .policy import make_policy

log = logging.getLogger(__name__)

_COUNTERS = (
    "lookups", "hits", "hits_dram", "hits_disk", "hits_redis", "misses", "redis_errors", "redis_writes",
    "bytes_read_redis", "bytes_written_redis", "partial_hits", "rejected_records", "expired",
    "reused_tokens", "prefilled_tokens", "saves", "prefetches", "prefetch_hits", "evictions_dram",
    "evictions_disk", "disk_writes", "disk_write_errors", "bytes_written_disk", "bytes_read_disk",
    "bytes_written_dram", "loads", "load_seconds", "restore_seconds", "save_seconds", "restore_load",
    "restore_recompute", "restore_both", "restore_tail", "staged", "staged_used", "staged_dropped", "saves_skipped",
    "saves_failed",
)


SIZED_SESSIONS = 4096  # sessions whose latest record size the windows' mean record size is taken over
TRIM_SESSIONS = 65536  # sessions held nowhere whose bookkeeping may pile up before it is trimmed

#: stores not closed yet. A script that ends without close() lost its last turns: the saves still under way
#: failed ("cannot schedule new futures after interpreter shutdown": the writer pools refuse work once the
#: interpreter exits) and write-back records were in DRAM only. Their saves are finished and their DRAM written
#: to disk as the interpreter exits (:meth:`AttentionStore._at_exit`).
_open_stores: "weakref.WeakSet[AttentionStore]" = weakref.WeakSet()


_exiting = threading.Event()  # set as the interpreter exits (the worker pools then stop taking work)


def _persist_open_stores() -> None:
    _exiting.set()
    for store in list(_open_stores):
        try:
            store._at_exit()
        except Exception as exc:  # (one store's failure does not keep the others from persisting)
            log.warning("persisting an AttentionStore at exit failed (%s: %s)", type(exc).__name__, exc)


# threading's exit hooks run before the interpreter's atexit ones, most recent first: this one runs before
# concurrent.futures' (registered when it was imported, above), which makes every pool refuse new work
getattr(threading, "_register_atexit", atexit.register)(_persist_open_stores)
# a forked child has none of the parent's worker threads: persisting its copies would wait for work that never runs
os.register_at_fork(after_in_child=_open_stores.clear)


def _as_ids(input_ids) -> torch.Tensor:
    """One sequence of token ids as ``[1, T]``: a tensor or list, a tokenizer's output (``input_ids`` taken), or
    generate()'s output with ``return_dict_in_generate=True`` (``sequences`` taken)."""
    if not isinstance(input_ids, torch.Tensor):
        if hasattr(input_ids, "sequences"):
            input_ids = input_ids.sequences
        elif hasattr(input_ids, "keys") and "input_ids" in input_ids.keys():
            input_ids = input_ids["input_ids"]
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"expected token ids (a tensor or list of ints, a tokenizer's output or generate()'s), got "
                        f"{type(input_ids).__name__}") from exc
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one sequence ([T] or [1, T]), got shape {tuple(ids.shape)}; "
                         "keep one AttentionStoreCache per conversation")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    return ids.long()


def _stripe(locks: list, key: str) -> threading.Lock:
    """The lock of ``key`` among ``locks`` (a fixed set shared by all sessions: no lock per session to clean up)."""
    return locks[hash(key) % len(locks)]


class _WriteOrder:
    """The order of one tier's asynchronous writes, per session: each write asked for gets a number from one
    counter; a write older than the newest asked for is skipped (that one writes). A session's entry lives while
    one of its writes is queued, so the bookkeeping is bounded by the writes in flight, not by the sessions ever
    seen. Writes of one session also run one at a time (``lock``): with ``save_workers`` > 1 an older record could
    otherwise land last."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._counter = itertools.count(1)
        self._asked: dict[str, list[int]] = {}  # key -> [newest write number, writes queued]
        self._locks = [threading.Lock() for _ in range(64)]

    def ask(self, key: str) -> int:
        with self._mutex:
            n = next(self._counter)
            entry = self._asked.setdefault(key, [0, 0])
            entry[0] = n
            entry[1] += 1
            return n

    def superseded(self, key: str, n: int) -> bool:
        with self._mutex:
            entry = self._asked.get(key)
            return entry is not None and entry[0] > n

    def done(self, key: str) -> None:
        with self._mutex:
            entry = self._asked.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._asked[key]

    def lock(self, key: str) -> threading.Lock:
        return _stripe(self._locks, key)

    def keys(self) -> set[str]:
        """The sessions with a write queued or under way."""
        with self._mutex:
            return set(self._asked)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._asked)


def _unstorable(cache: AttentionStoreCache) -> str | None:
    """Why the K/V this cache holds must not be stored as the conversation's, or ``None``."""
    if cache.masked:
        return "it ran with an attention mask that hides tokens (padding), and its K/V depend on that mask"
    if cache._weights is not None and cache._patch._weights_stamp(cache._model) != cache._weights:
        return "the model's weights changed since cache_for (its K/V may be of the old ones)"
    return _off_dtype(cache)


def _off_dtype(cache: AttentionStoreCache) -> str | None:
    """Records are stored in the model's dtype and restored with keys rotated in it. Under ``torch.autocast`` to
    a narrower type (a float32 model under bfloat16 autocast) that is exact; autocast to the *other* 16-bit type
    (a bfloat16 model under float16 autocast, or the reverse) computes K/V that the model's dtype cannot hold or
    rotates keys in another dtype than a restore would: such a turn is not stored (a restore would not give the
    same answer)."""
    model_dtype = _device_dtype(cache._model)[1]
    for layer in cache.layers:
        keys = layer.__dict__.get("_keys_")
        values = layer.__dict__.get("_values_")
        if keys is None or values is None or not keys.numel():
            continue
        if keys.dtype != model_dtype or torch.promote_types(values.dtype, model_dtype) != model_dtype:
            return (f"its K/V were computed in {keys.dtype} / {values.dtype} while the model's weights are "
                    f"{model_dtype} (autocast to another 16-bit type?): a restore would not give the same answer")
        return None
    return None


def _newer(shared: dict | None, local: SessionRecord) -> bool:
    """Whether the shared record (its Redis manifest: ``tokens``, ``turn``) is of a later turn than ``local``. By
    the turn each save counts (the turn restored + 1): a truncated conversation's newer record may hold fewer
    tokens than an older one. Records saved before turns were counted: the one holding more tokens."""
    if shared is None:
        return False
    turn, local_turn = shared.get("turn"), local.meta.get("turn")
    if turn is not None and local_turn is not None:
        return int(turn) > int(local_turn)
    return shared.get("tokens", -1) > local.num_tokens


def _shapes_match(rec: SessionRecord, kv_shapes: list[tuple[int, int]]) -> bool:
    if len(rec.layers) != len(kv_shapes):
        return False
    for lay, (heads, dim) in zip(rec.layers, kv_shapes):
        for t in (lay.keys, lay.values):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != heads or t.shape[3] != dim:
                return False
    return True


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
        self.policy = make_policy(self.config.policy)
        self.dram = DramTier(self.config.dram_bytes, self.policy, pin=self.config.pin_memory)
        self.disk = (DiskTier(self.config.disk_dir, self.config.disk_bytes, self.policy, fsync=self.config.fsync,
                              namespace=self.namespace)
                     if self.config.disk_dir else None)
        self.redis = None
        if self.config.redis_url:
            from .redis import RedisTier

            self.redis = RedisTier(self.config.redis_url, namespace=self.namespace,
                                   chunk_bytes=self.config.redis_chunk_bytes, ttl_seconds=self.config.redis_ttl_seconds,
                                   timeout_s=self.config.redis_timeout_s)
            why = self.redis.unavailable_reason()
            if why is not None:  # (the reason tells a dead server from a refused password)
                log.warning("Redis at %s is not usable (%s); the shared tier is skipped until it answers",
                            self.redis.shown_url, why)
        self._pool = ThreadPoolExecutor(self.config.save_workers, thread_name_prefix="attnstore-write")
        self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="attnstore-save")  # one: saves commit in order
        self._save_slots = threading.BoundedSemaphore(self.config.save_queue)
        self._saving: dict[str, Future] = {}
        self._prefetch_pool = ThreadPoolExecutor(self.config.prefetch_workers, thread_name_prefix="attnstore-prefetch")
        self._pending: set[Future] = set()
        self._writing: dict[str, SessionRecord] = {}  # records on their way to disk: still served
        # disk writes of one session run one at a time, in the order they were asked for, and a write a newer one
        # was asked after is skipped (with save_workers > 1 an older record could otherwise land last)
        self._disk_order = _WriteOrder()
        self._redis_order = _WriteOrder()  # (the same for the shared tier: Redis keeps whichever commits last)
        # a session's version: bumped by every save and drop. A record read from a lower tier (prefetch, a lookup's
        # promotion, a streamed restore) goes into DRAM only if the version did not change while it was read:
        # else an older record would replace the newer one, or bring a dropped session back
        # Versions come from one counter, so the entries of sessions held nowhere can be forgotten
        # (:meth:`_trim_bookkeeping`): a session without an entry reads as the highest version forgotten so far —
        # a read in flight across a forgetting then sees a change and is not promoted (a promotion missed, never
        # an old record brought back)
        self._versions: dict[str, int] = {}
        self._version_clock = itertools.count(1)
        self._version_floor = 0
        self._trim_lock = threading.Lock()
        self._trim_at = TRIM_SESSIONS
        self._dram_locks = [threading.Lock() for _ in range(64)]
        self._fingerprints: set[str] = set()  # of the models this store served: drop() finds Redis keys by them
        self._prefetching: set[str] = set()
        self._prefetched: set[str] = set()  # in DRAM thanks to a prefetch, not used yet
        self._protect_dram: frozenset[str] = frozenset()
        self._protect_disk: frozenset[str] = frozenset()
        # the mean record size for the windows: each session's latest record (of the SIZED_SESSIONS saved last);
        # a conversation's records grow turn by turn, so a mean over every save ever made undercounts them
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._sizes_total = 0
        self._lock = threading.Lock()
        self._stats = {k: 0 for k in _COUNTERS}
        self.cost = CostModel()
        self._staged: dict[str, AttentionStoreCache] = {}  # turns restored ahead of time, oldest first
        self._closed = False
        self._closing = False  # close() has begun: nothing is promoted into DRAM any more
        self._close_lock = threading.Lock()
        _open_stores.add(self)

    # ---- lookup / restore -------------------------------------------------------------------------------
    def _key(self, session_id: str) -> str:
        return session_key(self.namespace, session_id)

    def _expired(self, rec: SessionRecord) -> bool:
        return self._stale(rec.meta.get("saved_at", 0))

    def _stale(self, saved_at) -> bool:
        ttl = self.config.ttl_seconds
        return ttl is not None and time.time() - float(saved_at or 0) > ttl

    def get_record(self, session_id: str, fingerprint: str | None = None,
                   lazy: bool = False) -> tuple[SessionRecord | None, str | None]:
        """The stored record of a session and the tier it came from (``"dram"``/``"disk"``/``"redis"``), or
        ``(None, None)``. Redis is consulted only with the model ``fingerprint`` (its keys carry it).
        ``lazy``: a disk record is returned with only its header read and verified (``record._lazy`` reads the
        layers); it is promoted once every layer was read.

        A disk or Redis hit is promoted to DRAM. A record that fails validation is quarantined and is a miss.
        """
        session_id = _check_session_id(session_id)
        key = self._key(session_id)
        self._wait_save(key)
        t0 = time.perf_counter()
        since = self._version(key)
        rec, tier = self.dram.get(key), "dram"
        if rec is None:
            with self._lock:
                rec = self._writing.get(key)
        if rec is None and self.disk is not None:
            rec, tier = self._open_disk(session_id, key, whole=not lazy), "disk"
        if rec is None and fingerprint is not None:
            rec, tier = self._get_redis(session_id, key, fingerprint), "redis"
        if rec is not None and self._expired(rec):
            self._count("expired")
            self._release_lazy(rec)
            self._forget(key)
            if tier == "redis":  # else every lookup downloads it again only to find it expired
                from .redis import RedisUnavailable

                try:
                    self.redis.remove(key, fingerprint)
                except RedisUnavailable:
                    pass
            rec = None
        if rec is None:
            return None, None
        if tier in ("disk", "redis"):
            if getattr(rec, "_lazy", None) is None:
                self._promote(rec, since, shared=tier == "redis")
            else:
                rec._since = since  # promoted once streamed whole (_finish_lazy)
        elif key in self._prefetched:
            self._prefetched.discard(key)
            self._count("prefetch_hits")
        self._count("loads")
        self._count("load_seconds", time.perf_counter() - t0)
        return rec, tier

    def _open_disk(self, session_id: str, key: str, whole: bool, touch: bool = True,
                   admit=None) -> SessionRecord | None:
        """A disk record read straight into tensors: every layer read and verified now (``whole``), or only its
        header, with ``record._lazy`` reading the layers later (promoted to DRAM once all are verified).
        ``admit(record)``, if given, is asked once the header is verified (tensors not read yet): ``False``
        leaves the file unread. ``None`` if absent, not admitted or rejected (a bad file is quarantined)."""
        try:
            opened = self.disk.open_lazy(key, touch=touch, expect_namespace=self.namespace,
                                         expect_session=session_id)
            if opened is None:
                return None
            if admit is not None and not admit(opened.record):
                opened.close()
                return None
            if not whole:
                return opened.attach()
            try:
                rec = opened.materialize_all()
            finally:
                opened.close()
        except RecordError as exc:
            self._reject_disk(session_id, key, exc)
            return None
        self._count("bytes_read_disk", opened.bytes_read)
        return rec

    def _reject_disk(self, session_id: str, key: str, exc: RecordError) -> None:
        """A disk record failed validation: warn, count, move the file to quarantine (the turn recomputes)."""
        log.warning("session %r: disk record rejected (%s); quarantined, recomputing", session_id, exc)
        self._count("rejected_records")
        self.disk.quarantine(key, str(exc))

    def _get_redis(self, session_id: str, key: str, fingerprint: str) -> SessionRecord | None:
        if self.redis is None:
            return None
        from .redis import RedisUnavailable

        try:
            data = self.redis.get_bytes(key, fingerprint)
        except RedisUnavailable as exc:
            self._count("redis_errors")
            log.warning("session %r: Redis lookup failed (%s); treating as a miss", session_id, exc)
            return None
        if data is None:
            return None
        self._count("bytes_read_redis", len(data))
        try:
            return SessionRecord.from_bytes(data, expect_namespace=self.namespace, expect_session=session_id)
        except RecordError as exc:
            log.warning("session %r: Redis record rejected (%s); removing it, recomputing", session_id, exc)
            self._count("rejected_records")
            try:
                self.redis.remove(key, fingerprint)
            except RedisUnavailable:
                pass
            return None

    def _write_redis(self, rec: SessionRecord, gen: int) -> None:
        """Publish ``rec`` to Redis, unless a newer record of the session was asked to be published since (that one
        is: Redis keeps whichever write commits last, so an older one must not run after it)."""
        from .redis import RedisUnavailable

        try:
            with self._redis_order.lock(rec.key):
                if self._redis_order.superseded(rec.key, gen):
                    return
                far = self._far_copy(rec)
                n = self.redis.put_bytes(rec.key, rec.fingerprint, far.to_bytes(), tokens=rec.num_tokens,
                                         turn=rec.meta.get("turn"))
        except RedisUnavailable as exc:
            self._count("redis_errors")
            log.warning("session %r: could not publish the record to Redis (%s); local tiers keep it",
                        rec.session_id, exc)
            return
        finally:
            self._redis_order.done(rec.key)
        self._count("redis_writes")
        self._count("bytes_written_redis", n)

    def cache_for(self, model, session_id: str, input_ids) -> AttentionStoreCache:
        """An :class:`AttentionStoreCache` for this turn, holding whatever of ``input_ids`` the store can restore.

        ``input_ids`` is the whole conversation so far (history + new message). Pass ``cache.input_ids`` to
        ``model.generate(..., past_key_values=cache)``: it equals ``input_ids`` unless the conversation outgrew
        the context window and was truncated (then it is the kept tokens plus the new ones). Only the tokens
        past ``cache.reused_tokens`` are prefilled. A turn :meth:`stage`-d earlier with the same ids is handed
        over as it is (its loading already under way or done).
        """
        self._check_open()
        session_id = _check_session_id(session_id)
        staged = self._unstage(self._key(session_id))
        if staged is not None:
            if staged.forwards:  # the caller ran it already: theirs now, no longer this turn's restore
                log.info("session %r: the turn staged ahead was used before cache_for; restoring afresh", session_id)
                self._count("staged_dropped")
            elif staged._model is model and staged.user_ids == _as_ids(input_ids)[0].tolist():
                if staged._loader is not None:
                    staged._loader.release()
                self._count("staged_used")
                return self._served(staged)
            else:
                self._discard(staged)  # the turn changed since it was staged (another message, another model)
        return self._served(self._lookup(model, session_id, input_ids))

    def _served(self, cache: AttentionStoreCache) -> AttentionStoreCache:
        """Count in stats() what the lookup of a turn now served found (a staged turn: when it is handed over, not
        when it was staged, so that a staged turn dropped unused counts nothing)."""
        tally, cache._tally = cache._tally, {}
        with self._lock:
            for name, by in tally.items():
                self._stats[name] += by
        return cache

    def stage(self, model, session_id: str, input_ids) -> AttentionStoreCache:
        """Start restoring a turn before it is served: the serving loop knows what comes next (CachedAttention's
        read buffer). The next :meth:`cache_for` of this session with the same ``input_ids`` gets this cache, its
        layers loaded (``StoreConfig.stage_layers`` of them, or all) while the current turn computes.

        At most ``StoreConfig.stage_sessions`` turns are staged at once (the oldest is dropped); a save of the
        session, :meth:`drop` or :meth:`close` drops its staged turn. Staging never changes an answer: a staged
        cache is used only for exactly the ids it was built for.
        """
        self._check_open()
        session_id = _check_session_id(session_id)
        key = self._key(session_id)
        self._drop_staged(key)
        if self.config.stage_sessions == 0:  # staging off: an ordinary lookup, the caller's
            return self._served(self._lookup(model, session_id, input_ids))
        cache = self._lookup(model, session_id, input_ids, ahead=self.config.stage_layers)
        with self._lock:
            self._staged[key] = cache
            over = list(self._staged)[: max(0, len(self._staged) - self.config.stage_sessions)]
            dropped = [self._staged.pop(k) for k in over]
        for c in dropped:
            self._discard(c)
        self._count("staged")
        return cache

    def _unstage(self, key: str) -> AttentionStoreCache | None:
        with self._lock:
            return self._staged.pop(key, None)

    def _drop_staged(self, key: str, unless: AttentionStoreCache | None = None) -> None:
        """Discard the turn of ``key`` staged ahead, if any (``unless`` it is that cache)."""
        staged = self._unstage(key)
        if staged is not None and staged is not unless:
            self._discard(staged)

    def _discard(self, cache: AttentionStoreCache) -> None:
        if cache.discard():  # (False: the caller ran the cache stage() returned; it is theirs)
            self._count("staged_dropped")

    def _lookup(self, model, session_id: str, input_ids, ahead: int | None = None) -> AttentionStoreCache:
        user_ids = _as_ids(input_ids)
        t0 = time.perf_counter()
        cache = AttentionStoreCache(model, session_id=session_id, sliding_extra_tokens=self.config.sliding_extra_tokens)
        fingerprint = cache.fingerprint = cache._patch.fingerprint(model)
        cache._weights = cache._patch._weights_seen
        row = user_ids[0].cpu()  # ids the model cannot take: refused before anything is read or counted
        lo, hi = torch.aminmax(row)
        vocab = cache._patch.vocab_size
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}) for this model, got ids from {int(lo)} to {int(hi)}")
        self._fingerprints.add(fingerprint)
        tally = cache._tally = {"lookups": 1}  # what this turn counts in stats(): once it is served (see _served)
        cache._patch.on_prefill = self.cost.observe_prefill
        self._wait_save(self._key(session_id))
        t_read = time.perf_counter()
        rec, tier = self.get_record(session_id, fingerprint, lazy=self.config.layerwise)
        t_found = time.perf_counter()
        head = None
        if rec is not None and tier != "redis" and self.redis is not None and rec.fingerprint == fingerprint:
            # the local copy may be stale (another replica served a later turn): a newer record may be shared.
            # Whatever the lengths: a later turn of a truncated conversation may hold fewer tokens
            from .redis import RedisUnavailable

            since = self._version(rec.key)
            try:
                head = self.redis.head(rec.key, fingerprint)
            except RedisUnavailable:
                head = None
            shared = self._get_redis(session_id, rec.key, fingerprint) if _newer(head, rec) else None
            if shared is not None and _newer({"tokens": shared.num_tokens, "turn": shared.meta.get("turn")}, rec):
                self._release_lazy(rec)
                rec, tier = shared, "redis"
                self._promote(rec, since, shared=True)
        # a save is one turn more than the latest this replica knows of (a shared one it could not use included):
        # replicas tell the newer record by it
        local_turn = int(rec.meta.get("turn", 0)) if rec is not None else 0
        cache.record_turn = max(local_turn, int((head or {}).get("turn") or 0))
        if rec is not None:
            dtype = dtype_name(next(model.parameters()).dtype)
            if rec.fingerprint != fingerprint or rec.dtype != dtype:
                log.warning("session %r: stored record was written by another model or dtype (%s); recomputing",
                            session_id, rec.dtype)
                self._count("rejected_records")
                self._release_lazy(rec)
                rec = None
            elif not _shapes_match(rec, cache._patch.kv_shapes):
                log.warning("session %r: stored record's tensor shapes do not fit this model; recomputing",
                            session_id)
                self._count("rejected_records")
                self._release_lazy(rec)
                rec = None
        ids = user_list = row.tolist()
        # a record of a truncated conversation keeps the user's coordinates: map them to the kept tokens
        origin = rec.meta.get("origin_ids") if rec is not None else None
        if origin and ids[: len(origin)] == origin:
            ids = rec.token_ids + ids[len(origin):]
            cache.origin_ids = list(origin)
        else:
            cache.origin_ids = []
        reuse = reusable_length(rec, cache, ids) if rec is not None else 0
        keep = torch.arange(reuse)
        dropped = 0
        limit = self._context_limit(model)
        if len(ids) + self.config.reserve_tokens > limit and self.config.truncation != "off":
            ids, keep, dropped = self._truncate(ids, reuse, limit)
            cache.truncated = dropped
        if rec is not None and keep.numel():
            # the rotary frequencies of the forward that runs: over the kept ids, if truncated (as save() notes them)
            regime = cache._patch.rope_regime(model, len(ids))
            if regime is not None and rec.meta.get("rope_regime") != regime:
                log.info("session %r: the stored K/V were computed with other rotary frequencies (%s, this turn %s); "
                         "recomputing", session_id, rec.meta.get("rope_regime"), regime)
                keep = keep[:0]
        positions = torch.arange(keep.numel()) if self.config.truncation != "nkvt" else keep
        t_match = time.perf_counter()
        if keep.numel():
            keep = self._restore(cache, model, rec, tier, keep, positions, len(ids), time.perf_counter() - t_read,
                                 ahead)
            cache.carried = cache.carried and keep.numel() > 0  # nothing restored: all prefilled from the ids
        elif rec is not None:
            self._release_lazy(rec)
        t_restore = time.perf_counter()
        reuse = keep.numel()
        cache.user_ids = user_list
        cache.turn_ids = ids
        if ids is user_list:  # no truncation, no mapping: the user's ids are the cache's (no host list to tensor)
            cache.input_ids = user_ids.clone()
        else:
            cache.input_ids = torch.tensor([ids], dtype=torch.long, device=user_ids.device)
            if ids != user_list:
                cache._expect_first = len(ids) - keep.numel()
        if reuse > 0:
            cache.prefix_ids = ids[:reuse]
            cache._base_ids = list(cache.prefix_ids)
            cache.source = tier
            tally.update({"hits": 1, f"hits_{tier}": 1})
            if reuse < rec.num_tokens:
                tally["partial_hits"] = 1
        else:
            tally["misses"] = 1
        t_end = time.perf_counter()
        cache.load_seconds = t_end - t0
        cache.host_ms.update(prepare=(t_read - t0) * 1e3, find=(t_found - t_read) * 1e3,
                             match=(t_match - t_found) * 1e3, restore=(t_restore - t_match) * 1e3,
                             finish=(t_end - t_restore) * 1e3)
        tally.update(reused_tokens=reuse, prefilled_tokens=len(ids) - reuse, restore_seconds=cache.load_seconds)
        log.debug("session %r: %d tokens%s, %d restored from %s, %d to prefill (%.1f ms)", session_id, len(ids),
                  f" ({dropped} dropped by truncation)" if dropped else "", reuse, tier or "-", len(ids) - reuse,
                  cache.load_seconds * 1e3)
        return cache

    def _restore(self, cache, model, rec, tier, keep, positions, total_len, read_s, ahead=None) -> torch.Tensor:
        """Restore ``keep`` as the cost model picks (load / recompute / both); returns what was restored.
        K/V that attended to tokens a truncation dropped (this turn's, or the record's since) are not what
        recomputing their ids gives (``cache.carried``): they are loaded whole, never recomputed in part, so the
        answer does not depend on timings (``restore_mode="recompute"``, the user's choice, recomputes them all)."""
        from ..pipeline.split import restore_both

        t_begin = time.perf_counter()
        n = keep.numel()
        rec_bytes, rec_tokens = rec.nbytes, max(rec.num_tokens, 1)  # (a sum over the layers: once)
        nbytes = int(rec_bytes * n / rec_tokens)
        device = next(model.parameters()).device
        plain = bool(torch.equal(keep, torch.arange(n)) and torch.equal(positions, keep))
        carried = cache.carried = not plain or bool(rec.meta.get("carried") or rec.meta.get("origin_ids"))
        cache._patch.read_timings()
        # a shorter prefix: not with sliding-window layers (their record holds the window before the last token)
        tail_ok = not any(isinstance(layer, SlidingLayer) for layer in cache.layers)
        # `both` recomputes the first tokens in a forward of their own, shorter than the turn: not where the rotary
        # frequencies depend on the length (longrope, dynamic)
        both_ok = cache._patch.static_rope(model)
        plan = self.cost.choose(tier, nbytes, n, self.config.restore_mode, accelerator=device.type != "cpu",
                                can_split=plain and not carried, new_tokens=max(total_len - n, 0),
                                layerwise=self.config.layerwise, can_tail=tail_ok, can_recompute=not carried,
                                can_both=both_ok)
        cache.restore_plan = plan
        cache._tally[f"restore_{plan['choice']}"] = 1
        t0 = time.perf_counter()
        lazy = getattr(rec, "_lazy", None)
        if plan["choice"] == "recompute":
            log.debug("session %r: recomputing %d tokens rather than loading them (%s)", cache.session_id, n, plan)
            self._release_lazy(rec)
            return keep[:0]
        if plan["choice"] == "tail":  # load the head; the tail is recomputed with the new tokens, in one forward
            keep, positions = keep[: n - plan["split"]], positions[: n - plan["split"]]
            nbytes = int(rec_bytes * keep.numel() / rec_tokens)
        loading = plan["choice"] in ("load", "tail")
        streamed = lazy is not None and loading and plain and self.config.layerwise
        if lazy is not None and not streamed and not self._materialize(rec):
            return keep[:0]  # rejected: a miss
        if plan["choice"] == "both":
            ok = restore_both(cache, model, rec, n, plan["split"], total_len)
        else:
            ok = restore(cache, model, rec, keep, positions, total_len, layerwise=self.config.layerwise,
                         before=(lambda i: lazy.materialize(i, pin=device.type == "cuda")) if streamed else None,
                         ahead=ahead, threaded=self.config.restore_thread, pace=plan.get("pace"))
        if not ok:  # (a failed load of `both` said so itself)
            log.info("session %r: the stored KV cannot be restored here (a sliding layer lacks the window of the "
                     "kept tokens, or loading failed); recomputing", cache.session_id)
            self._release_lazy(rec)
            return keep[:0]
        loader = cache._loader
        if loader is not None:
            def done(ld, rec=rec, streamed=streamed):
                if streamed:  # every layer read and verified: the record is whole, promote it
                    self._finish_lazy(rec)
                self.cost.observe_loader(tier, nbytes, read_s, ld)

            def failed(exc, rec=rec):
                if streamed:
                    self._release_lazy(rec)
                    self._reject_disk(rec.session_id, rec.key, RecordError(str(exc)))

            loader.on_done, loader.on_failure = done, failed
            if streamed:
                loader.on_cancel = lambda rec=rec: self._release_lazy(rec)
            if loading:  # this host work comes before the forward: part of the turn
                self.cost.observe_restore_host(tier, time.perf_counter() - t_begin)
        elif streamed:
            self._finish_lazy(rec)
        if loader is None and loading:
            self.cost.observe_load(tier, nbytes, read_s + time.perf_counter() - t0)
        return keep

    def _materialize(self, rec: SessionRecord) -> bool:
        """Read and verify every layer of a lazily opened disk record now; ``False`` (rejected) on a bad file."""
        try:
            rec._lazy.materialize_all()
        except RecordError as exc:
            self._release_lazy(rec)
            self._reject_disk(rec.session_id, rec.key, exc)
            return False
        self._finish_lazy(rec)
        return True

    def _finish_lazy(self, rec: SessionRecord) -> None:
        lazy = getattr(rec, "_lazy", None)
        if lazy is None:
            return
        self._count("bytes_read_disk", lazy.bytes_read)
        self._release_lazy(rec)
        self._promote(rec, getattr(rec, "_since", None))

    @staticmethod
    def _release_lazy(rec: SessionRecord | None) -> None:
        lazy = getattr(rec, "_lazy", None)
        if lazy is not None:
            lazy.close()
            rec._lazy = None

    def _context_limit(self, model) -> int:
        if self.config.max_context is not None:
            return self.config.max_context
        text = model.config.get_text_config(decoder=True)
        return int(getattr(text, "max_position_embeddings", None) or 1 << 62)

    def _truncate(self, ids: list[int], reuse: int, limit: int) -> tuple[list[int], torch.Tensor, int]:
        """Drop the oldest tokens after ``keep_prefix`` so that the turn fits ``limit`` (minus the reserve).

        Drops ``truncation_ratio`` of the history (at least what is needed). ``ca``/``nkvt``: the dropped span is
        taken from the restorable prefix, and the kept record tokens are reused. ``tt``: the same span is
        dropped and everything kept is recomputed. Returns (new ids, record indices to restore, dropped).
        """
        cfg = self.config
        budget = limit - cfg.reserve_tokens
        if budget <= cfg.keep_prefix:
            raise ValueError(f"max_context ({limit}) - reserve_tokens ({cfg.reserve_tokens}) leaves no room after "
                             f"keep_prefix ({cfg.keep_prefix})")
        p = min(cfg.keep_prefix, len(ids))
        need = len(ids) - budget
        want = max(need, math.ceil(cfg.truncation_ratio * (len(ids) - p)))
        drop = min(want, len(ids) - p - 1)
        kept_ids = ids[:p] + ids[p + drop:]
        if cfg.truncation == "tt" or reuse <= p + drop:
            keep = torch.arange(min(reuse, p)) if cfg.truncation != "tt" else torch.arange(0)
        else:
            keep = torch.cat([torch.arange(p), torch.arange(p + drop, reuse)])
        return kept_ids, keep, drop

    # ---- save ---------------------------------------------------------------------------------------------
    def record_from_cache(self, session_id: str, cache: AttentionStoreCache, sequences) -> SessionRecord:
        """Snapshot ``cache`` (host copies of its pre-RoPE K/V) as a record of ``sequences``' tokens (blocking)."""
        session_id = _check_session_id(session_id)
        why = _unstorable(cache)
        if why:
            raise ValueError(f"this cache cannot be stored as the conversation's: {why}")
        head = self._record_head(session_id, cache, sequences)
        return self._build_record(head, Snapshot(cache, self.config.codec, head["prompt"]))

    def _record_head(self, session_id: str, cache: AttentionStoreCache, sequences) -> dict:
        """Everything of a record but its tensors; raises ValueError for a ``sequences`` that does not fit."""
        seq = _as_ids(sequences)[0].tolist()
        n = cache.get_seq_length()
        if n == 0:
            raise ValueError("the cache is empty: nothing to save (run generate() with it first)")
        if n > len(seq):
            raise ValueError(f"the cache holds {n} tokens but sequences has only {len(seq)}: pass generate()'s output")
        # the ids the cache was made for (cache.input_ids; the restored ones at least): a record claiming the K/V
        # of other ids would give the next turn a wrong answer
        made_for = cache.turn_ids if cache.turn_ids is not None else cache.prefix_ids
        m = min(n, len(made_for))
        if seq[:m] != made_for[:m]:
            raise ValueError("sequences does not start with the ids this cache was made for (cache.input_ids): pass "
                             "generate()'s output for the same conversation")
        held = cache.held_ids()  # the ids the forwards were given: the K/V are theirs
        if held is not None and len(held) >= n and seq[:n] != held[:n]:
            at = next(i for i, (a, b) in enumerate(zip(seq, held)) if a != b)
            raise ValueError(f"sequences differs from the tokens this cache computed at position {at}: pass the "
                             "output of the generate() call that ran on this cache")
        rows = cache._rows()
        prompt = None
        if rows != 1:  # beam search: one row per beam, the same up to where generation began
            if cache.turn_ids is None:
                raise ValueError(f"only batch size 1 can be saved as a session (cache batch is {rows})")
            prompt = n = min(n, len(cache.turn_ids))
            prompt_views(cache, cache.raw_layers(), prompt)  # ValueError if a sliding layer no longer holds it
            log.info("session %r: the cache holds %d beams; saving the %d tokens they share (the reply's %d are "
                     "prefilled next turn)", session_id, rows, n, len(seq) - n)
        # tokens past the cache (normally the last generated one) have no KV yet; kept so history() is complete.
        # turn: one more than the record cache_for found (replicas sharing Redis tell the newer record by it)
        meta = {"tail_ids": seq[n:], "turn": cache.record_turn + 1}
        start = len(cache.turn_ids) if cache.turn_ids is not None else n
        regime = cache._patch.rope_regime(cache._model, start)
        if regime is not None:  # the frequencies its K/V were computed with; "mixed" if the turn crossed a threshold
            meta["rope_regime"] = regime if regime == cache._patch.rope_regime(cache._model, n) else "mixed"
        if cache.carried:  # its K/V hold context a truncation dropped: never recomputed in part (see _restore)
            meta["carried"] = True
        if cache.user_ids is not None and cache.input_ids is not None:
            offset = len(cache.user_ids) - cache.input_ids.shape[1]
            if offset > 0:  # truncated: remember the user's coordinates of what the record holds
                origin = cache.user_ids + seq[cache.input_ids.shape[1]:]
                meta["origin_ids"] = origin[: n + offset]
        return {"session_id": session_id, "token_ids": seq[:n], "meta": meta, "kinds": cache.layer_kinds,
                "fingerprint": cache.fingerprint or cache._patch.fingerprint(cache._model), "prompt": prompt}

    def _build_record(self, head: dict, snap: Snapshot) -> SessionRecord:
        layers = [LayerKV(kind, start, p["k"], p["v"], p.get("ks"), p.get("vs"))
                  for kind, start, p in zip(head["kinds"], snap.starts, snap.host_parts())]
        dtype = dtype_name(snap.dtype)
        return SessionRecord(self.namespace, head["session_id"], head["fingerprint"], dtype, head["token_ids"],
                             layers, meta=head["meta"], codec=self.config.codec)

    def save(self, session_id: str, cache: AttentionStoreCache, sequences) -> Future:
        """Store the conversation held by ``cache``. ``sequences`` is generate()'s output (prompt + reply).

        Returns at once (``async_save``): the K/V are copied off the device without blocking compute (a write
        stream on CUDA) and the record is built and committed by a background thread. The returned future's
        ``result()`` is the committed :class:`SessionRecord` (``None`` if nothing was stored: a turn whose attention
        mask hid tokens, padding, has K/V that depend on that mask; a warning says so). The next ``cache_for`` of
        the same session waits for it; :meth:`flush` waits for every save. The last generated token has no KV
        yet (the next turn prefills it). The record goes to DRAM, and to disk in the background (write-through)
        or when evicted / at :meth:`close` (write-back).
        """
        self._check_open()
        session_id = _check_session_id(session_id)
        if not isinstance(cache, AttentionStoreCache):
            raise TypeError(f"save() needs an AttentionStoreCache (from store.cache_for), got {type(cache).__name__}")
        why = _unstorable(cache)
        if why:
            log.warning("session %r: this turn is not stored (the session keeps its previous record): %s",
                        session_id, why)
            self._count("saves_skipped")
            done: Future = Future()
            done.set_result(None)
            return done
        t0 = time.perf_counter()
        head = self._record_head(session_id, cache, sequences)
        key = self._key(session_id)
        self._drop_staged(key, unless=cache)  # a turn of this session staged before this save: the old record
        if not self.config.async_save:
            fut: Future = Future()
            rec = self._build_record(head, Snapshot(cache, self.config.codec, head["prompt"]))
            self.put_record(rec)
            fut.set_result(rec)
            self._count("save_seconds", time.perf_counter() - t0)
            return fut
        self._save_slots.acquire()  # back-pressure: at most save_queue saves in flight
        try:
            snap = Snapshot(cache, self.config.codec, head["prompt"])
        except BaseException:
            self._save_slots.release()
            raise
        try:
            fut = self._save_pool.submit(self._commit_save, head, snap)
        except BaseException as exc:
            self._save_slots.release()
            snap.abandon()  # never copied: the cache must not wait for it before changing
            if isinstance(exc, RuntimeError):  # close() on another thread shut the pool down after the check above
                if _exiting.is_set() and not self._closing:
                    raise AttnStoreError("the interpreter is exiting: its worker pools take no more work, so this "
                                         "turn was not stored (a thread that outlives the main one cannot save)") from exc
                raise AttnStoreError("this AttentionStore was closed during the save; nothing was stored") from exc
            raise
        with self._lock:
            self._pending.add(fut)
            self._saving[key] = fut
        fut.add_done_callback(lambda f, key=key, snap=snap: self._save_done(key, f, snap))
        self._count("save_seconds", time.perf_counter() - t0)
        return fut

    def _commit_save(self, head: dict, snap: Snapshot) -> SessionRecord:
        try:
            rec = self._build_record(head, snap)
            self.put_record(rec)
            return rec
        except Exception as exc:
            self._count("saves_failed")
            log.warning("session %r: saving failed (%s: %s); the next turn recomputes", head["session_id"],
                        type(exc).__name__, exc)
            raise

    def _save_done(self, key: str, fut: Future, snap: Snapshot) -> None:
        if fut.cancelled():  # (an interrupted close() cancels the saves not started)
            snap.abandon()
        self._save_slots.release()
        with self._lock:
            self._pending.discard(fut)
            if self._saving.get(key) is fut:
                del self._saving[key]

    def _wait_save(self, key: str) -> None:
        """Read your writes: a lookup of a session waits for that session's save in flight."""
        with self._lock:
            fut = self._saving.get(key)
        if fut is not None:
            try:
                fut.result()
            except Exception:
                pass  # reported by the save itself; the lookup sees what the tiers hold

    def put_record(self, rec: SessionRecord) -> None:
        """Commit a record: DRAM first (evicting by policy), disk by the write policy."""
        self._check_open()
        if rec.namespace != self.namespace:
            raise ValueError(f"record of namespace {rec.namespace!r} put into a store of namespace {self.namespace!r}")
        try:
            rec.check_layout()  # (a lazily opened record's placeholders have the real shapes and dtypes)
        except RecordError as exc:
            raise ValueError(f"record of session {rec.session_id!r} is not well formed: {exc}") from None
        rec.meta["saved_at"] = time.time()  # ttl_seconds counts from the last save: this one
        with self._lock:
            self._sizes_total += rec.nbytes - self._sizes.pop(rec.key, 0)
            self._sizes[rec.key] = rec.nbytes
            while len(self._sizes) > SIZED_SESSIONS:
                self._sizes_total -= self._sizes.popitem(last=False)[1]
        self._prefetched.discard(rec.key)
        self.policy.touch(rec.key)
        with self._dram_lock(rec.key):
            self._bump(rec.key)
            kept = self._put_dram(rec)
            if self.disk is not None and (self.config.write_policy == "write_through" or not kept):
                self._write_disk_async(rec)  # (asked for under the lock: see _trim_bookkeeping)
            if self.redis is not None and rec.fingerprint:
                self._write_redis_async(rec)  # (in the order the session's records went into DRAM)
        if rec.fingerprint:
            self._fingerprints.add(rec.fingerprint)
        self._count("saves")
        log.debug("session %r: saved %d tokens (%d bytes)%s", rec.session_id, rec.num_tokens, rec.nbytes,
                  "" if kept else " straight to disk (no room in DRAM)")
        self._trim_bookkeeping()

    def _dram_lock(self, key: str) -> threading.Lock:
        return _stripe(self._dram_locks, key)

    def _bump(self, key: str) -> None:
        with self._lock:
            self._versions.pop(key, None)  # (re-inserted: the dict stays in the order of the last changes)
            self._versions[key] = next(self._version_clock)

    def _version(self, key: str) -> int:
        with self._lock:
            return self._versions.get(key, self._version_floor)

    def _trim_bookkeeping(self) -> None:
        """Forget the versions of sessions not in DRAM with nothing of them under way (a write, save, prefetch or
        staged turn), and the policy's access times of those also not on disk, once there are more than twice as
        many entries as after the last trim (so the work is amortized): a server seeing millions of conversations
        keeps bookkeeping for the ones it holds, not for every one it ever served. Called with no lock held; holds
        every DRAM lock while it runs (a record leaving DRAM has its disk write asked for under its lock)."""
        with self._lock:
            if len(self._versions) + len(self.policy.last_access) <= self._trim_at or self._closing:
                return
        if not self._trim_lock.acquire(blocking=False):
            return  # another thread is trimming
        try:
            # what the tiers hold, read before the DRAM locks are taken (the disk tier's lock is held through a whole
            # write: saves must not wait for it here); a session placed after this is in the policy's tiers, which
            # forget_unplaced checks itself
            held = set(self.dram.keys()) | set(self.disk.keys() if self.disk is not None else ())
            for lock in self._dram_locks:  # (always in this order; no other code holds two of them)
                lock.acquire()
            try:
                with self._lock:
                    busy = set(self._saving) | set(self._staged) | set(self._writing) | self._prefetching
                    busy |= self._disk_order.keys()
                    for key in [k for k in self._versions if k not in busy and not self.dram.contains(k)]:
                        self._version_floor = max(self._version_floor, self._versions.pop(key))
                self.policy.forget_unplaced(lambda k: k not in busy and k not in held)
                with self._lock:
                    self._trim_at = max(TRIM_SESSIONS, 2 * (len(self._versions) + len(self.policy.last_access)))
            finally:
                for lock in self._dram_locks:
                    lock.release()
        finally:
            self._trim_lock.release()

    def _promote(self, rec: SessionRecord, since: int | None, protect=None, shared: bool = False) -> bool:
        """Put ``rec``, read from a lower tier, into DRAM unless the session was saved or dropped since version
        ``since`` (then the newer state stays). Returns whether ``rec`` went in. A record read from Redis
        (``shared``) is on no local disk: it is written there too if DRAM did not keep it (larger than DRAM, or
        yielding to the sessions the queue protects) or if the write policy keeps DRAM's records on disk."""
        with self._dram_lock(rec.key):
            if since is not None and self._version(rec.key) != since:
                log.debug("session %r: saved or dropped while its record was read; not promoted", rec.session_id)
                return False
            if self._closing:  # (a restore finishing after close(): the evictions' writes have no writer left)
                return False
            with self._lock:
                queued = self._writing.get(rec.key)
            if queued is not None and queued is not rec:  # a newer record of the session is on its way to disk
                # (a prefetch queued before a save, run after that save's record left DRAM, read the older file)
                log.debug("session %r: a newer record is being written; the one read is not promoted",
                          rec.session_id)
                return False
            kept = self._put_dram(rec, protect=protect)
            if shared and self.disk is not None and (not kept or self.config.write_policy == "write_through"):
                self._write_disk_async(rec)  # (skipped if a save or drop of the session comes first)
            return kept

    def _put_dram(self, rec: SessionRecord, protect=None) -> bool:
        """Put ``rec`` in DRAM; demote what it evicts. Returns whether ``rec`` itself stayed in DRAM: not if it is
        larger than DRAM, nor if (with a disk below) it would push out a session the queue protects. Called under
        the session's DRAM lock, its version current: a write of ``rec`` is skipped once a save or a drop of the
        session came after (see :meth:`_write_disk`)."""
        with self._lock:  # its version has an entry from now on: forgetting another session leaves it as it is
            rec._version = self._versions.setdefault(rec.key, self._version_floor)
        evicted = self.dram.put(rec, protect=self._protect_dram if protect is None else protect,
                                yield_to_protected=self.disk is not None)
        kept = True
        for old in evicted:
            if old is rec or old.key == rec.key:
                kept = False
                continue
            self._count("evictions_dram")
            self._prefetched.discard(old.key)
            # write-through: already on disk (or on its way); write-back: demote it now
            if self.disk is not None and self.config.write_policy == "write_back":
                self._write_disk_async(old)
        if kept:
            self._count("bytes_written_dram", rec.nbytes)
        return kept

    def _write_disk_async(self, rec: SessionRecord) -> None:
        with self._lock:  # (one step: the record lookups find among the writes is the newest one asked for)
            self._writing[rec.key] = rec
            gen = self._disk_order.ask(rec.key)
        self._submit(functools.partial(self._write_disk, gen=gen), rec, order=self._disk_order)

    def _write_redis_async(self, rec: SessionRecord) -> None:
        self._submit(functools.partial(self._write_redis, gen=self._redis_order.ask(rec.key)), rec,
                     order=self._redis_order)

    def _submit(self, fn, rec: SessionRecord, order: _WriteOrder | None = None) -> None:
        """Run ``fn(rec)`` on a writer thread; :meth:`flush` waits for it. (``order``: the write was counted there;
        if it cannot be queued it is not.)"""
        try:
            fut = self._pool.submit(fn, rec)
        except BaseException:
            if order is not None:
                order.done(rec.key)
            raise
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _far_copy(self, rec: SessionRecord) -> SessionRecord:
        """The record as the disk and Redis tiers store it (``disk_codec``)."""
        codec = self.config.disk_codec
        return rec if codec is None or codec == rec.codec else transcode(rec, codec)

    def _write_disk(self, rec: SessionRecord, gen: int | None = None) -> None:
        """Write ``rec`` to disk; ``gen``: its place among this session's asynchronous writes (skipped if a newer
        one was asked for: that one writes; or if the session was saved or dropped since ``rec`` went into DRAM:
        a demotion queued just after a drop() brought the session back)."""
        with self._disk_order.lock(rec.key):
            try:
                superseded = gen is not None and (self._disk_order.superseded(rec.key, gen) or getattr(
                    rec, "_version", None) not in (None, self._version(rec.key)))
                if not superseded:
                    self._write_disk_now(rec)
            finally:  # written, failed or skipped: lookups no longer find it among the writes under way
                with self._lock:
                    if self._writing.get(rec.key) is rec:
                        del self._writing[rec.key]
                if gen is not None:
                    self._disk_order.done(rec.key)

    def _write_disk_now(self, asked: SessionRecord) -> None:
        rec = self._far_copy(asked)  # (another object when disk_codec differs)
        try:
            before = self.disk.evictions
            # write-back: a session also in DRAM has its newest record there and is written again when demoted,
            # so its disk copy is the first to go when room is needed (nothing is lost, room is not wasted)
            first = frozenset(self.dram.keys()) if self.config.write_policy == "write_back" else frozenset()
            n = self.disk.put(rec, protect=self._protect_disk, first=first)
            self._count("evictions_disk", self.disk.evictions - before)
        except OSError as exc:
            self._count("disk_write_errors")
            kept = "it stays in DRAM only" if self.dram.contains(rec.key) else "it is not stored (larger than DRAM)"
            log.warning("session %r: could not write record to %s (%s); %s", rec.session_id, self.disk.dir, exc,
                        kept)
            return
        self._count("disk_writes")
        self._count("bytes_written_disk", n)

    # ---- scheduler-aware placement ------------------------------------------------------------------------
    def mean_record_bytes(self) -> float:
        """Mean size of the sessions' latest records (saved by this store; else those in DRAM)."""
        with self._lock:
            total, n = self._sizes_total, len(self._sizes)
        if n:
            return total / n
        sizes = [self.dram.peek(k).nbytes for k in self.dram.keys()]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def windows(self) -> tuple[int | None, int | None]:
        """(prefetch window, eviction window) in sessions: DRAM / mean record size, (DRAM + disk) / mean size."""
        mean = self.mean_record_bytes()
        if mean <= 0:
            return None, None
        cap_dram = self.dram.capacity
        cap_disk = self.disk.capacity if self.disk is not None else 0
        pw = None if cap_dram is None else int(cap_dram // mean)
        ew = None if cap_dram is None or cap_disk is None else int((cap_dram + cap_disk) // mean)
        return pw, ew

    def plan(self, upcoming_session_ids, wait: bool = False) -> list[str]:
        """Tell the store the serving queue's look-ahead (session ids, head first).

        With the ``scheduler`` policy: sessions in the prefetch window at the head of the queue are loaded
        disk -> DRAM in the background and kept there; eviction takes sessions outside the queue first, then the
        furthest in the queue; sessions inside the eviction window are the last to be dropped from disk.
        Returns the session ids a prefetch was started for. ``wait=True`` waits for those prefetches and the
        disk writes they caused (deterministic placement, for simulations and tests).
        """
        self._check_open()
        ids = list(dict.fromkeys(_check_session_id(s) for s in upcoming_session_ids))  # a session's next turn
        keys = [self._key(s) for s in ids]
        self.policy.plan(keys)
        if self.policy.name != "scheduler":
            return []
        pw, ew = self.windows()
        # the windows count sessions the store holds: a new conversation in the queue needs no room
        with self._lock:
            saving = set(self._saving) | set(self._writing)  # a save still under way: held a moment from now
        on_disk = {key for key in keys if self.disk is not None and self.disk.contains(key)}
        held = [(sid, key) for sid, key in zip(ids, keys) if key in saving or key in on_disk or self.dram.contains(key)]
        ids, keys = [sid for sid, _ in held], [key for _, key in held]
        head = keys if pw is None else keys[:pw]
        self._protect_dram = frozenset(head)
        self._protect_disk = frozenset(keys if ew is None else keys[:ew])
        started, futures = [], []
        if self.disk is None:
            return started
        for pos, (sid, key) in enumerate(zip(ids, head)):
            with self._lock:
                busy = key in self._prefetching or key in self._writing
            if busy or key not in on_disk or self.dram.contains(key):
                continue
            with self._lock:
                self._prefetching.add(key)
            # room may be taken from anything but the sessions ahead of this one in the queue
            futures.append(self._prefetch_pool.submit(self._prefetch, sid, key, frozenset(head[:pos])))
            started.append(sid)
        if wait:  # the prefetches and the demotions they caused
            for f in futures:
                f.result()
            self.flush()
        return started

    def _prefetch(self, session_id: str, key: str, protect: frozenset) -> None:
        try:
            since = self._version(key)
            if self.dram.contains(key):
                return
            # not read at all if it would push out a session nearer the head of the queue
            rec = self._open_disk(session_id, key, whole=True, touch=False,
                                  admit=lambda r: self.dram.fits(r.nbytes, protect))
            if rec is None:
                return
            if self._promote(rec, since, protect=protect):
                self._prefetched.add(key)
                self._count("prefetches")
        except Exception as exc:  # a prefetch is an optimisation: never let it take the store down
            log.warning("session %r: prefetch failed (%s: %s)", session_id, type(exc).__name__, exc)
        finally:
            with self._lock:
                self._prefetching.discard(key)

    def history(self, session_id: str) -> list[int] | None:
        """The full token ids of a stored conversation (what the next turn should extend), or ``None``.

        Verifies the record but neither promotes it nor counts a lookup (the turn's ``cache_for`` does).
        """
        key = self._key(_check_session_id(session_id))
        self._wait_save(key)
        rec = self.dram.peek(key)
        if rec is None:
            with self._lock:
                rec = self._writing.get(key)
        if rec is None and self.disk is not None:
            data = self.disk.get_bytes(key, touch=False)
            try:
                rec = None if data is None else SessionRecord.from_bytes(
                    data, expect_namespace=self.namespace, expect_session=session_id)
            except RecordError:
                rec = None  # cache_for will report and quarantine it
        if rec is None or self._expired(rec):
            return None
        return rec.token_ids + [int(t) for t in rec.meta.get("tail_ids", [])]

    def sessions(self) -> list[dict]:
        """Sessions of this namespace the store holds: ``{"session_id", "tokens", "bytes", "tier"}``, newest first.

        Reads only the JSON headers of disk records (no tensors).
        """
        out: dict[str, dict] = {}
        for key in self.dram.keys():
            rec = self.dram.peek(key)
            if rec is not None:
                out[rec.session_id] = {"session_id": rec.session_id, "tokens": rec.num_tokens, "bytes": rec.nbytes,
                                       "tier": "dram", "saved_at": rec.meta.get("saved_at", 0)}
        if self.disk is not None:
            for key in self.disk.keys():
                head = self.disk.read_header(key)
                try:  # the header's own checksum: a damaged one is left out (a lookup quarantines it)
                    _check_head(head or {}, self.namespace, None)
                    sid, tokens, saved_at = head["session_id"], len(head["token_ids"]), head["meta"].get("saved_at", 0)
                except (RecordError, KeyError, TypeError, AttributeError):
                    continue
                if sid not in out:
                    out[sid] = {"session_id": sid, "tokens": tokens, "bytes": self.disk._index.get(key, 0),
                                "tier": "disk", "saved_at": saved_at}
        live = [r for r in out.values() if not self._stale(r["saved_at"])]  # expired: what a lookup would drop
        return sorted(live, key=lambda r: -float(r["saved_at"] or 0))

    # ---- housekeeping ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every pending write has finished. A save that failed does not raise here (it was warned
        about, counted in ``stats()["saves_failed"]``, and its future holds the exception)."""
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return
            wait(pending)

    def wait_prefetch(self) -> None:
        """Wait until the prefetches started by :meth:`plan` have finished."""
        self._prefetch_pool.submit(lambda: None).result()

    def drop(self, session_id: str) -> None:
        """Forget a session in every tier: DRAM, disk and, in Redis, its records for the models this store has
        served (a closed store raises: it changes nothing any more)."""
        self._check_open()
        self.flush()
        key = self._key(_check_session_id(session_id))
        self._drop_staged(key)
        self._forget(key)
        if self.redis is not None:
            from .redis import RedisUnavailable

            for fp in sorted(self._fingerprints):
                try:
                    self.redis.remove(key, fp)
                except RedisUnavailable as exc:
                    self._count("redis_errors")
                    log.warning("session %r: could not remove its shared record from Redis (%s)", session_id, exc)
                    break
        self._trim_bookkeeping()

    def _forget(self, key: str) -> None:
        with self._dram_lock(key):
            self._bump(key)  # a read of a lower tier in flight does not bring the session back
            self.dram.remove(key)
        if self.disk is not None:  # after a write under way (its file is removed), before one queued (skipped)
            with self._disk_order.lock(key):
                self.disk.remove(key)
        with self._lock:
            self._writing.pop(key, None)
            self._sizes_total -= self._sizes.pop(key, 0)
        self._prefetched.discard(key)
        self.policy.forget(key)

    def close(self) -> None:
        """Flush, persist every DRAM record to disk (so a new process resumes every session), stop the workers."""
        with self._close_lock:  # a second close() waits for the first, then returns
            if self._closed:
                return
            self._closing = True
            try:
                self._shut_down()
            except BaseException:
                # interrupted (Ctrl-C) or failed: finish the shutdown all the same — the saves under way and
                # queued, the DRAM records' way to disk (write-back holds sessions nowhere else), the workers
                # stopped — then say why; a second interrupt stops it
                try:
                    self._shut_down()
                finally:
                    self._closed = True
                raise
            self._closed = True
            _open_stores.discard(self)

    def _shut_down(self) -> None:
        """close()'s steps; each may be run again after an interruption."""
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
        for cache in staged:
            self._discard(cache)
        self._prefetch_pool.shutdown(wait=True)
        self.flush()
        self._save_pool.shutdown(wait=True)
        self._persist_dram()
        self._pool.shutdown(wait=True)

    def _persist_dram(self) -> None:
        """Write to disk, on this thread, every DRAM record the disk does not hold yet (write-back: every one)."""
        if self.disk is not None:
            for key in self.dram.keys():
                rec = self.dram.peek(key)
                if rec is not None and (self.config.write_policy == "write_back" or not self.disk.contains(key)):
                    self._write_disk(rec)

    def _at_exit(self) -> None:
        """The interpreter is exiting with this store open (no close()): the saves under way are finished and DRAM
        written to disk, before the worker pools stop taking work. The store is not closed: threads that outlive
        the main thread may still use it (what they save from then on is refused, as the pools have stopped)."""
        with self._close_lock:
            if self._closed:
                return
            with self._lock:  # the saves and writes under way now (threads still saving would hold the exit up)
                pending = list(self._pending)
            wait(pending)
            self._persist_dram()

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
        s["mean_load_s"] = s["load_seconds"] / s["loads"] if s["loads"] else 0.0
        s["mean_save_s"] = s["save_seconds"] / s["saves"] if s["saves"] else 0.0
        s["policy"] = self.policy.name
        s["dram_records"], s["dram_bytes"] = len(self.dram), self.dram.used
        s["disk_records"], s["disk_bytes"] = (len(self.disk), self.disk.used) if self.disk is not None else (0, 0)
        return s
