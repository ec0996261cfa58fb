"""CostModel: measured tier bandwidth and prefill speed; per turn it picks load, recompute, or both at once."""

from __future__ import annotations

import threading

#: weight of a new measurement in the running averages
_EMA = 0.3
#: "both" is only worth its bookkeeping when each side gets at least this many tokens
MIN_SPLIT = 32
#: below this predicted time loading is kept (estimates of tiny restores are noise); above it auto recomputes
#: when that is predicted faster than loading (x this margin: never slower than recompute, as predicted)
MIN_DECISION_S = 0.02
RECOMPUTE_MARGIN = 1.0
#: tiers whose records can be restored in part. Disk and Redis records are read and checked whole (a checksum
#: covers a whole tensor), so recomputing the first tokens of one saves no reading: "both" is never better
#: than loading there, and auto does not pick it (measured on an H100: a forced both from disk took 1.2 s,
#: the recompute 0.26 s)
PARTIAL_TIERS = frozenset({"dram"})
#: restores smaller than this are not measured: their time is thread start-up and lock waits, not bandwidth
MIN_MEASURED_BYTES = 1 << 20


class CostModel:
    """Running estimates of how fast each tier restores a byte and how fast the model prefills a token.

    ``choose`` compares ``load_s = bytes / bandwidth[tier]`` against ``recompute_s = tokens * seconds_per_token``
    and recomputes when that is predicted faster. ``both`` (the idea of Cake, arXiv 2410.03065) recomputes the
    first ``r`` tokens while the rest load, with ``r`` chosen so both finish together:
    ``r * s_tok = (tokens - r) * bytes_per_token / bandwidth``. It only pays where loading and computing use
    different resources and the record can be loaded in part, so ``auto`` picks it on accelerators, for DRAM
    records (:data:`PARTIAL_TIERS`), not on a CPU (where the loader's decoding and the model share the cores).
    """

    def __init__(self):
        self.bandwidth: dict[str, float] = {}    # tier -> bytes per second (restore, end to end)
        self.s_per_token: float | None = None    # prefill seconds per token
        self._pending: list = []                 # (tier, nbytes, loader) measurements not resolved yet
        self._lock = threading.Lock()

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < MIN_MEASURED_BYTES:
            return
        bw = nbytes / seconds
        with self._lock:
            old = self.bandwidth.get(tier)
            self.bandwidth[tier] = bw if old is None else (1 - _EMA) * old + _EMA * bw

    def observe_loader(self, tier: str, nbytes: int, extra_s: float, loader) -> None:
        """A layer-wise restore's time is known once its events complete: resolve it later, without waiting."""
        if nbytes < MIN_MEASURED_BYTES:
            return
        with self._lock:
            self._pending.append((tier, nbytes, extra_s, loader))
        self._resolve()

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        s = seconds / tokens
        with self._lock:
            self.s_per_token = s if self.s_per_token is None else (1 - _EMA) * self.s_per_token + _EMA * s

    def _resolve(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for tier, nbytes, extra_s, loader in pending:
            sec = loader.seconds()
            if sec is None:
                keep.append((tier, nbytes, extra_s, loader))
            else:
                self.observe_load(tier, nbytes, sec + extra_s)
        with self._lock:
            self._pending.extend(keep[-16:])

    def choose(self, tier: str, nbytes: int, tokens: int, mode: str, accelerator: bool,
               can_split: bool = True) -> dict:
        """``{"choice", "predicted_load_s", "predicted_recompute_s", "split"}`` for restoring ``tokens`` tokens
        (``nbytes`` bytes) from ``tier``. ``split`` = tokens recomputed first when the choice is ``both``."""
        self._resolve()
        bw = self.bandwidth.get(tier)
        load_s = nbytes / bw if bw else None
        rec_s = tokens * self.s_per_token if self.s_per_token else None
        plan = {"choice": "load", "tier": tier, "tokens": tokens, "bytes": nbytes, "predicted_load_s": load_s,
                "predicted_recompute_s": rec_s, "split": 0, "mode": mode}
        both_r = None
        if load_s is not None and rec_s is not None and can_split and tier in PARTIAL_TIERS:
            r = round(tokens * load_s / (load_s + rec_s))
            if MIN_SPLIT <= r <= tokens - MIN_SPLIT:
                both_r = r
        if mode == "recompute":
            plan["choice"] = "recompute"
        elif mode == "both":
            if can_split and tokens >= 2 * MIN_SPLIT:
                plan["choice"], plan["split"] = "both", both_r if both_r is not None else tokens // 2
        elif mode == "auto" and load_s is not None and rec_s is not None and load_s > MIN_DECISION_S:
            if accelerator and both_r is not None and load_s > 0.5 * rec_s:
                plan["choice"], plan["split"] = "both", both_r
            elif rec_s * RECOMPUTE_MARGIN < load_s:
                plan["choice"] = "recompute"
        if plan["choice"] == "both":
            r = plan["split"]
            loaded = (tokens - r) / tokens if tier in PARTIAL_TIERS else 1.0  # whole-read tiers read it all
            plan["predicted_both_s"] = (max(r * self.s_per_token, loaded * nbytes / bw)
                                        if load_s is not None and rec_s is not None else None)
        return plan
