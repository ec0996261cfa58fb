"""StoreConfig: capacities, directories, namespace and policies of an AttentionStore."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: int | float | str | None, name: str = "size") -> int | None:
    """Parse a byte size: an int, or a string like ``"2GB"``, ``"512 MiB"``, ``"1.5gb"`` or ``"2G"`` (K, M, G, T:
    decimal, as KB...). ``None`` means unbounded."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of bytes or a string like '2GB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number of bytes (None for unbounded), got {value!r}")
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(
        f"{name}={value!r} is not a size: use an int number of bytes or a string such as '512MB', '2GB' or '1GiB'"
    )


def default_disk_dir() -> Path:
    """``$ATTNSTORE_HF_HOME/sessions`` or ``~/.cache/attnstore_hf/sessions``."""
    return cache_home() / "sessions"


def cache_home() -> Path:
    """Where attnstore-hf keeps converted models and session records (``$ATTNSTORE_HF_HOME`` overrides)."""
    env = os.environ.get("ATTNSTORE_HF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnstore_hf"


@dataclass
class StoreConfig:
    """Configuration of an :class:`~attnstore_hf.AttentionStore`.

    Args:
        dram_bytes: capacity of the host-memory tier (int bytes or ``"2GB"``). ``None`` = unbounded.
        disk_dir: directory of the disk tier. ``None`` disables the disk tier (records then live only in DRAM).
            The string ``"default"`` means :func:`default_disk_dir`.
        disk_bytes: capacity of the disk tier. ``None`` = unbounded.
        namespace: tenant name. Records of one namespace are never served to another.
        write_policy: ``"write_through"`` (every save is also written to disk, in the background) or
            ``"write_back"`` (written to disk only when evicted from DRAM or at ``close()``).
        save_workers: background threads writing records to disk.
        policy: ``"lru"``, ``"fifo"`` or ``"scheduler"`` (scheduler-aware: uses :meth:`AttentionStore.plan`;
            sessions not in the queue fall back to LRU).
        prefetch_workers: background threads loading queued sessions disk -> DRAM.
        ttl_seconds: records not saved for this long are dropped when next looked at (``None``: never).
        pin_memory: keep DRAM records in page-locked memory when CUDA is available.
        fsync: make each disk write durable before it counts (turn off only for simulations).
        max_context: context window in tokens; ``None`` = the model's ``max_position_embeddings``.
        truncation: what to do when a turn (plus ``reserve_tokens``) overflows the window: ``"ca"`` drop the
            oldest stored K/V and re-embed positions (no recompute, default), ``"tt"`` drop the same tokens and
            recompute the kept ones, ``"nkvt"`` keep the kept keys at their old positions (a baseline),
            ``"off"`` do nothing.
        truncation_ratio: share of the history dropped when truncating (the paper's default 0.5).
        keep_prefix: leading tokens never dropped (system prompt, attention sinks).
        reserve_tokens: room kept free for the reply when deciding whether a turn overflows.
        redis_url: a shared Redis / Valkey tier below the local disk (``redis://host:port/db``,
            ``rediss://`` for TLS, ``redis+cluster://`` for a Cluster). Every save is published to it in the
            background; a session missing locally (or only stale locally) is looked up there.
        redis_ttl_seconds: expiry of records in Redis (``None``: never).
        redis_chunk_bytes: largest value written to Redis (records are chunked).
        redis_timeout_s: socket timeout; a timeout or a dead server is a miss, retried after a short back-off.
        codec: how records are stored: ``"none"`` (the model's dtype: exact), ``"bf16"``/``"fp16"``,
            ``"int8"`` (keys per channel, values per token, with scales) or ``"fp8"`` (e4m3, scaled likewise).
        disk_codec: the codec of the disk and Redis copies (``None``: the same as ``codec``), e.g. DRAM ``none``
            and disk ``int8``. A record is always decoded by the codec it names.
        layerwise: restore layer by layer in the background (a thread on CPU, a side stream on CUDA), each layer
            waiting only for its own K/V, so loading overlaps the forward.
        restore_mode: ``"auto"`` (per turn, from measured bandwidth and prefill speed: load, recompute, both or
            tail), ``"load"``, ``"recompute"``, ``"both"`` (recompute the first tokens while loading the rest) or
            ``"tail"`` (load the first tokens; the last are recomputed with the new ones, in the turn's forward).
            ``both`` and ``tail`` are picked by ``auto`` on accelerators only, for DRAM records.
        async_save: ``save()`` returns at once; the copy off the device and the commit run in the background.
        save_queue: saves in flight at most (back-pressure on the caller beyond that).
        stage_sessions: turns :meth:`~attnstore_hf.AttentionStore.stage` may restore ahead of time at once (the
            oldest is dropped beyond that; 0 turns staging off). Each holds its restored KV on the device.
        stage_layers: layers a staged turn loads before it is served (``None``: all); the rest load once the turn
            asks for them, so a staged turn takes little transfer bandwidth from the turn being served, and device
            memory only for those layers (the others' buffers are allocated when the turn starts).
        restore_thread: on an accelerator, issue a layer-wise restore's copies and kernels from the loader thread
            rather than from the thread calling ``cache_for`` (``False``: only a restore that must read the disk
            uses the thread). The forward then starts at once and the two threads issue side by side; Python's
            lock is released inside torch's operations.
        sliding_extra_tokens: sliding-window layers (Gemma 3's local layers, Mistral's) hold only the window
            before the last token, so a later turn that goes back in the conversation (an undone or edited last
            message, a regenerated reply) cannot restore them and recomputes everything. With this > 0 they also
            keep the pre-RoPE K/V of up to this many tokens that left the window during the turn (never attended
            to) and store them in the record: a turn going back up to that many tokens is restored. Costs that many
            tokens per sliding layer in every record (0: none; the chat script uses 512).
    """

    dram_bytes: int | str | None = "2GB"
    disk_dir: str | os.PathLike | None = None
    disk_bytes: int | str | None = "20GB"
    namespace: str = "default"
    write_policy: str = "write_through"
    save_workers: int = 1
    policy: str = "scheduler"
    prefetch_workers: int = 1
    ttl_seconds: float | None = None
    pin_memory: bool = True
    fsync: bool = True
    max_context: int | None = None
    truncation: str = "ca"
    truncation_ratio: float = 0.5
    keep_prefix: int = 0
    reserve_tokens: int = 256
    redis_url: str | None = None
    redis_ttl_seconds: float | None = None
    redis_chunk_bytes: int | str = "4MB"
    redis_timeout_s: float = 1.0
    codec: str = "none"
    disk_codec: str | None = None
    layerwise: bool = True
    restore_mode: str = "auto"
    async_save: bool = True
    save_queue: int = 4
    stage_sessions: int = 2
    stage_layers: int | None = None
    restore_thread: bool = False
    sliding_extra_tokens: int = 0

    def _check_types(self) -> None:
        """Flags are bools and counts ints (``"no"`` would be true, ``2.5`` layers meaningless); seconds and ratios
        finite numbers."""
        for name in ("pin_memory", "fsync", "layerwise", "async_save", "restore_thread"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, optional in (("save_workers", False), ("prefetch_workers", False), ("save_queue", False),
                               ("stage_sessions", False), ("keep_prefix", False), ("reserve_tokens", False),
                               ("sliding_extra_tokens", False),
                               ("stage_layers", True), ("max_context", True)):
            v = getattr(self, name)
            if not (v is None and optional) and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ConfigError(f"{name} must be an int{' or None' if optional else ''}, got {v!r}")
        for name, optional in (("ttl_seconds", True), ("redis_ttl_seconds", True), ("truncation_ratio", False),
                               ("redis_timeout_s", False)):
            v = getattr(self, name)
            if not (v is None and optional) and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                                                 or not math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number{' or None' if optional else ''}, got {v!r}")

    def __post_init__(self) -> None:
        self._check_types()
        self.dram_bytes = parse_size(self.dram_bytes, "dram_bytes")
        self.disk_bytes = parse_size(self.disk_bytes, "disk_bytes")
        self.redis_chunk_bytes = parse_size(self.redis_chunk_bytes, "redis_chunk_bytes")
        if self.redis_url is not None and not str(self.redis_url).startswith(("redis://", "rediss://", "unix://",
                                                                             "redis+cluster://", "rediss+cluster://")):
            raise ConfigError(f"redis_url must look like redis://host:port/db, got {self.redis_url!r}")
        if self.disk_dir == "default":
            self.disk_dir = default_disk_dir()
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not str(self.disk_dir).strip():
                raise ConfigError(f"disk_dir must be a directory path (None: no disk tier), got {self.disk_dir!r}")
            self.disk_dir = Path(self.disk_dir).expanduser()
            if self.disk_dir.exists() and not self.disk_dir.is_dir():
                raise ConfigError(f"disk_dir {str(self.disk_dir)!r} exists and is not a directory")
        if not isinstance(self.namespace, str) or not self.namespace or "\x00" in self.namespace:
            # NUL separates namespace and session id in a record's key: in a namespace, two tenants' keys could meet
            raise ConfigError(f"namespace must be a non-empty string without NUL, got {self.namespace!r}")
        if self.write_policy not in ("write_through", "write_back"):
            raise ConfigError(f"write_policy must be 'write_through' or 'write_back', got {self.write_policy!r}")
        from .codec import check_codec

        check_codec(self.codec)
        if self.disk_codec is not None:
            check_codec(self.disk_codec)
        if self.policy not in ("lru", "fifo", "scheduler"):
            raise ConfigError(f"policy must be 'lru', 'fifo' or 'scheduler', got {self.policy!r}")
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ConfigError(f"ttl_seconds must be > 0 or None, got {self.ttl_seconds!r}")
        if self.prefetch_workers < 1:
            raise ConfigError(f"prefetch_workers must be >= 1, got {self.prefetch_workers}")
        if self.truncation not in ("ca", "tt", "nkvt", "off"):
            raise ConfigError(f"truncation must be 'ca', 'tt', 'nkvt' or 'off', got {self.truncation!r}")
        if not 0.0 < self.truncation_ratio < 1.0:
            raise ConfigError(f"truncation_ratio must be in (0, 1), got {self.truncation_ratio!r}")
        if self.keep_prefix < 0 or self.reserve_tokens < 0:
            raise ConfigError("keep_prefix and reserve_tokens must be >= 0")
        if self.max_context is not None and self.max_context < 2:
            raise ConfigError(f"max_context must be >= 2, got {self.max_context!r}")
        if self.max_context is not None and self.reserve_tokens >= self.max_context:
            raise ConfigError(f"reserve_tokens ({self.reserve_tokens}) must be below max_context "
                              f"({self.max_context}): no turn would fit")
        if (self.max_context is not None and self.truncation != "off"
                and self.keep_prefix >= self.max_context - self.reserve_tokens):
            raise ConfigError(f"keep_prefix ({self.keep_prefix}) must be below max_context - reserve_tokens "
                              f"({self.max_context - self.reserve_tokens}): truncation could drop nothing")
        if self.redis_timeout_s <= 0:
            raise ConfigError(f"redis_timeout_s must be > 0, got {self.redis_timeout_s!r}")
        if self.redis_chunk_bytes < 1:
            raise ConfigError(f"redis_chunk_bytes must be at least 1 byte, got {self.redis_chunk_bytes!r}")
        if self.restore_mode not in ("auto", "load", "recompute", "both", "tail"):
            raise ConfigError("restore_mode must be 'auto', 'load', 'recompute', 'both' or 'tail', got "
                              f"{self.restore_mode!r}")
        if self.sliding_extra_tokens < 0:
            raise ConfigError(f"sliding_extra_tokens must be >= 0, got {self.sliding_extra_tokens}")
        self.sliding_extra_tokens = int(self.sliding_extra_tokens)  # (a numpy integer passes the check above)
        if self.stage_sessions < 0:
            raise ConfigError(f"stage_sessions must be >= 0, got {self.stage_sessions}")
        if self.stage_layers is not None and self.stage_layers < 0:
            raise ConfigError(f"stage_layers must be >= 0 or None, got {self.stage_layers}")
        if self.save_queue < 1:
            raise ConfigError(f"save_queue must be >= 1, got {self.save_queue}")
        if self.save_workers < 1:
            raise ConfigError(f"save_workers must be >= 1, got {self.save_workers}")
