"""CostModel: measured tier bandwidth and prefill speed; per turn it picks load, recompute, or both at once."""

from __future__ import annotations

import bisect
import statistics
import threading
from collections import deque

#: weight of a new measurement in the running averages
_EMA = 0.3
#: "both" is only worth its bookkeeping when each side gets at least this many tokens
MIN_SPLIT = 32
#: below this predicted turn time loading is kept (estimates of tiny turns are noise); above it auto recomputes
#: when that is predicted faster than loading (x this margin: never slower than recompute, as predicted). The
#: turn, not the load alone: on an H100 a 1,024-token record loads in 5 ms, but the turn that loads it took
#: 37-63 ms against 36-47 ms recomputed (the restore's host work and the new tokens' forward)
MIN_DECISION_S = 0.02
RECOMPUTE_MARGIN = 1.0
#: tiers whose records can be restored in part. Disk and Redis records are read and checked whole (a checksum
#: covers a whole tensor), so recomputing the first tokens of one saves no reading: "both" is never better
#: than loading there, and auto does not pick it (measured on an H100: a forced both from disk took 1.2 s,
#: the recompute 0.26 s)
PARTIAL_TIERS = frozenset({"dram"})
#: prefill forwards the fit of the prefill time is made over
PREFILL_SAMPLES = 32
#: restores smaller than this are not measured: their time is thread start-up and lock waits, not bandwidth
MIN_MEASURED_BYTES = 1 << 20
#: restores per tier the fit of the load time is made over
LOAD_SAMPLES = 32


class CostModel:
    """Running estimates of how fast each tier restores a byte and how long a prefill forward of n tokens takes;
    per turn, a prediction of the turn's prefill time for each way to get the stored prefix back.

    The prefill time ``P(n)`` comes from the recent forwards: interpolated between the sizes seen, and outside
    them the line ``a + b * n`` fitted through them (``a``: what a forward costs however few its tokens — on a
    GPU at ~100 tokens, mostly launching kernels; ``b``: seconds per token); see :meth:`prefill_seconds`. For a
    turn with ``T`` stored tokens and ``new`` new ones:

    * load: ``H + max(load_s, P(new))`` layer-wise (the load hides behind the new tokens' forward; ``H``: the
      host time ``cache_for`` spends setting the restore up and issuing it, measured per tier, which comes
      first), or ``load_s + P(new)`` without; ``load_s`` from the tier's measured restores
      (:meth:`load_seconds`);
    * recompute: ``P(T + new)``, one forward over everything;
    * both (the idea of Cake, arXiv 2410.03065): the first ``r`` tokens recomputed in a forward of their own
      while the rest load, ``r`` chosen so both finish together, then the new tokens:
      ``H + max(P(r), (T - r) / T * load_s) + P(new)``. Only where loading and computing use different resources
      (an accelerator, not a CPU where the loader and the model share the cores) and the record can be loaded
      in part (:data:`PARTIAL_TIERS`).
    * tail: the first ``T - r`` tokens loaded layer-wise and the last ``r`` recomputed *with the new tokens*, in
      the turn's one forward: ``H + max((T - r) / T * load_s, P(r + new))``, ``r`` where the two meet. Worth it
      where the load is the slower side (``load_s > P(new)``): the forward has time to spare, and on a
      launch-bound accelerator a forward of a few hundred more tokens costs next to nothing (an H100, Llama-2-7B
      shape, 8,192 tokens: load 100 ms, new tokens 30 ms, 1,124 tokens 41 ms). Unlike *both* it adds no forward.
      Same conditions as *both*.

    ``auto`` takes the fastest prediction; loading while nothing is known yet or the load is tiny. Once both are
    known, the plan also gives the turn's ``pace``: ``(P(new) / load_s, H / load_s)``, how much slower the forward
    goes through the layers than the load, and the load's head start (see :func:`attnstore_hf.cache._group_starts`).
    """

    def __init__(self):
        self.bandwidth: dict[str, float] = {}    # tier -> bytes per second (restore, end to end)
        self.restore_host_s: dict[str, float] = {}  # tier -> host seconds a layer-wise restore adds to its turn
        self._prefills: deque = deque(maxlen=PREFILL_SAMPLES)  # (tokens, seconds) of recent prefill forwards
        self._loads: dict[str, deque] = {}  # tier -> (bytes, seconds) of recent measured restores
        self._fits: dict = {}      # "prefill" / ("load", tier) -> a fit of those samples, until the next one
        self._observed: dict = {}  # the same keys -> samples observed so far (a fit made meanwhile is not kept)
        self._pending: list = []                 # (tier, nbytes, loader) measurements not resolved yet
        self._lock = threading.Lock()

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < MIN_MEASURED_BYTES:
            return
        bw = nbytes / seconds
        with self._lock:
            self._loads.setdefault(tier, deque(maxlen=LOAD_SAMPLES)).append((nbytes, seconds))
            self._invalidate(("load", tier))
            old = self.bandwidth.get(tier)
            self.bandwidth[tier] = bw if old is None else (1 - _EMA) * old + _EMA * bw

    def observe_loader(self, tier: str, nbytes: int, extra_s: float, loader) -> None:
        """A layer-wise restore's time is known once its events complete: resolve it later, without waiting."""
        if nbytes < MIN_MEASURED_BYTES:
            return
        with self._lock:
            self._pending.append((tier, nbytes, extra_s, loader))
        self._resolve()

    def observe_restore_host(self, tier: str, seconds: float) -> None:
        """Host time ``cache_for`` spent setting up and issuing a layer-wise restore from ``tier``: it comes before
        the forward and adds to the turn (the loader's own time, measured on the side stream or the loader
        thread, overlaps the forward and does not include it)."""
        if seconds < 0:
            return
        with self._lock:
            old = self.restore_host_s.get(tier)
            self.restore_host_s[tier] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._prefills.append((tokens, seconds))
            self._invalidate("prefill")

    @property
    def s_per_token(self) -> float | None:
        """Prefill seconds per further token (the fitted line's slope); ``None`` before any forward was timed."""
        line = self.prefill_line()
        return None if line is None else line[1]

    def prefill_line(self) -> tuple[float, float] | None:
        """``(a, b)``: a prefill forward of ``n`` tokens is predicted to take ``a + b * n`` seconds. A least-squares
        line through the recent forwards once their sizes differ by 2x or more (``a`` clamped at 0), else through
        the origin; ``None`` before any forward was timed."""
        fit = self._fitted()
        return None if fit is None else fit[0]

    def _invalidate(self, key) -> None:
        """A sample was added to ``key``'s (called under the lock)."""
        self._fits.pop(key, None)
        self._observed[key] = self._observed.get(key, 0) + 1

    def _cached(self, key, samples, make):
        """``make(samples())``, made once per sample added (``cache_for`` asks several times per turn, on the host
        time of the turn), outside the lock; a fit that a new sample overtook while it was made is not kept."""
        with self._lock:
            if key in self._fits:
                return self._fits[key]
            seen, data = self._observed.get(key, 0), samples()
        fit = make(data)
        with self._lock:
            if self._observed.get(key, 0) == seen:
                self._fits[key] = fit
        return fit

    def _fitted(self):
        """``(line, sizes, times)`` of the recent forwards, ``None`` before any was timed."""
        return self._cached("prefill", lambda: list(self._prefills), self._fit_prefill)

    def _fit_prefill(self, samples):
        if not samples:
            return None
        by_size: dict[int, list[float]] = {}
        for tokens, seconds in samples:
            by_size.setdefault(tokens, []).append(seconds)
        sizes = sorted(by_size)
        times = [statistics.median(by_size[k]) for k in sizes]
        for i in range(1, len(times)):
            times[i] = max(times[i], times[i - 1])
        return self._line(samples), sizes, times

    @staticmethod
    def _line(samples) -> tuple[float, float]:
        xs = [t for t, _ in samples]
        n = len(samples)
        mx, my = sum(xs) / n, sum(y for _, y in samples) / n
        if max(xs) >= 2 * min(xs):
            sxx = sum((x - mx) ** 2 for x in xs)
            b = sum((x - mx) * (y - my) for x, y in samples) / sxx
            a = my - b * mx
            if b > 0 and a >= 0:
                return a, b
        return 0.0, my / mx

    def prefill_seconds(self, n: int) -> float | None:
        """Predicted time of a prefill forward of ``n`` tokens: within the sizes seen, interpolated between the
        nearest ones (median time per size, made non-decreasing); outside them, the fitted line (never below the
        largest size's time above it, never above the smallest's below it). ``None`` before any forward was
        timed. A GPU's prefill time is far from a line — flat while launch-bound, then growing — so a line
        through 100- and 8,192-token forwards put 1,124 tokens at 58 ms where an H100 took 36."""
        fit = self._fitted()
        if fit is None:
            return None
        if n <= 0:
            return 0.0
        line, sizes, times = fit
        lin = line[0] + line[1] * n
        if n > sizes[-1]:
            return max(lin, times[-1])
        if n < sizes[0]:
            return min(lin, times[0])
        j = bisect.bisect_left(sizes, n)
        if sizes[j] == n:
            return times[j]
        x0, x1, y0, y1 = sizes[j - 1], sizes[j], times[j - 1], times[j]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

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

    def load_seconds(self, tier: str, nbytes: int) -> float | None:
        """Predicted time to restore ``nbytes`` from ``tier``: once restores of sizes 2x apart or more were
        measured, the line ``a + b * bytes`` through the recent ones (a fixed part — launches, events, a thread's
        start — and the bandwidth; an H100 loaded 1,024 tokens of Llama-3-8B KV in 5.4 ms and 8,192 in 27, so the
        small load's bandwidth alone put 8,192 at 43 ms); else ``bytes / bandwidth`` (the running average).
        ``None`` before any restore of the tier was measured."""
        bw = self.bandwidth.get(tier)
        if not bw:
            return None
        fit = self._cached(("load", tier), lambda: list(self._loads.get(tier, ())), self._fit_load)
        return fit[0] + fit[1] * nbytes if fit is not None else nbytes / bw

    def _fit_load(self, samples):
        """The line through the restores if their sizes differ 2x or more and it has a fixed part (``a > 0``),
        else ``None`` (the bandwidth alone)."""
        if not samples:
            return None
        a, b = self._line(samples)
        return (a, b) if a > 0 else None  # a == 0: no proper fit (sizes too close, or no fixed part)

    def _tail_split(self, tokens: int, new_tokens: int, load_s: float) -> int | None:
        """The ``r`` at which loading the first ``tokens - r`` tokens takes as long as the forward over the last
        ``r`` and the new tokens (the first falls with ``r``, the second never does: bisection); ``None`` if it
        is outside ``[MIN_SPLIT, tokens - MIN_SPLIT]``."""
        lo, hi = MIN_SPLIT, tokens - MIN_SPLIT
        if lo > hi:
            return None

        def gap(r):
            return (tokens - r) / tokens * load_s - self.prefill_seconds(r + new_tokens)

        if gap(lo) <= 0:  # the forward is already the slower side with the fewest tokens worth splitting off
            return None
        if gap(hi) > 0:
            return hi
        while hi - lo > max(1, tokens // 256):
            mid = (lo + hi) // 2
            if gap(mid) > 0:
                lo = mid
            else:
                hi = mid
        return hi

    def choose(self, tier: str, nbytes: int, tokens: int, mode: str, accelerator: bool,
               can_split: bool = True, new_tokens: int = 0, layerwise: bool = True,
               can_tail: bool | None = None, can_recompute: bool = True, can_both: bool = True) -> dict:
        """How to restore ``tokens`` stored tokens (``nbytes`` bytes) from ``tier`` for a turn that then
        prefills ``new_tokens``: ``{"choice": "load"|"recompute"|"both"|"tail", "split", "predicted_load_s",
        "predicted_recompute_s", "predicted_turn_s": {choice: seconds}, ...}``. ``split`` = tokens recomputed
        first when the choice is ``both``, last (with the new ones) when it is ``tail``;
        ``predicted_recompute_s`` is the stored tokens' own prefill. ``can_split``: the stored tokens may be
        restored in two parts (no truncation); ``can_tail`` (default: ``can_split``): a shorter prefix may be
        restored (not with sliding-window layers, whose record holds only the window before its last token);
        ``can_recompute``: ``auto`` may pick recomputing (not for K/V that hold context a truncation dropped: the
        answer would change with the timings; ``mode="recompute"`` still recomputes); ``can_both``: the first
        tokens may be recomputed in a forward of their own (not where the rotary frequencies depend on the
        length)."""
        self._resolve()
        can_tail = can_split if can_tail is None else can_split and can_tail
        load_s = self.load_seconds(tier, nbytes)
        line = self.prefill_line()
        prefill = self.prefill_seconds
        # a layer-wise restore's host work comes before the forward (a sync restore's time includes its own)
        host = self.restore_host_s.get(tier, 0.0) if layerwise else 0.0

        plan = {"choice": "load", "tier": tier, "tokens": tokens, "bytes": nbytes, "predicted_load_s": load_s,
                "predicted_recompute_s": prefill(tokens) if line else None, "split": 0, "mode": mode,
                "predicted_restore_host_s": host}
        turn: dict[str, float] = {}
        both_r = tail_r = None
        if load_s is not None and line is not None:
            t_new = prefill(new_tokens)
            turn["load"] = host + max(load_s, t_new) if layerwise else load_s + t_new
            if layerwise and load_s > 0:  # how the forward keeps pace with the load: sizes restore groups
                plan["pace"] = (t_new / load_s, host / load_s)
            turn["recompute"] = prefill(tokens + new_tokens)
            if can_split and tier in PARTIAL_TIERS and tokens >= 2 * MIN_SPLIT:
                a, b = line  # a + b r = (1 - r / T) load_s: both halves finish together
                r = round((load_s - a) / (b + load_s / tokens))
                if can_both and MIN_SPLIT <= r <= tokens - MIN_SPLIT:
                    both_r = r
                    turn["both"] = host + max(prefill(r), (tokens - r) / tokens * load_s) + t_new
                if layerwise and can_tail and load_s > t_new:
                    tail_r = self._tail_split(tokens, new_tokens, load_s)
                    if tail_r is not None:
                        turn["tail"] = host + max((tokens - tail_r) / tokens * load_s, prefill(tail_r + new_tokens))
            plan["predicted_turn_s"] = turn
        if mode == "recompute":
            plan["choice"] = "recompute"
        elif mode == "both":
            if can_split and can_both and tokens >= 2 * MIN_SPLIT:
                plan["choice"], plan["split"] = "both", both_r if both_r is not None else tokens // 2
        elif mode == "tail":
            if can_tail and tokens >= 2 * MIN_SPLIT:
                if tail_r is None:  # nothing measured: half; the load already the faster side: the fewest
                    tail_r = MIN_SPLIT if turn else tokens // 2
                plan["choice"], plan["split"] = "tail", tail_r
        elif mode == "auto" and turn and turn["load"] > MIN_DECISION_S:
            options = {k: v for k, v in turn.items()
                       if (k not in ("both", "tail") or accelerator) and (k != "recompute" or can_recompute)}
            best = min(options, key=options.get)
            if best == "recompute" and turn["recompute"] * RECOMPUTE_MARGIN >= turn["load"]:
                best = "load"
            plan["choice"] = best
            if best in ("both", "tail"):
                plan["split"] = both_r if best == "both" else tail_r
        if plan["choice"] == "both" and load_s is not None and line is not None:
            r = plan["split"]
            loaded = (tokens - r) / tokens if tier in PARTIAL_TIERS else 1.0  # whole-read tiers read it all
            plan["predicted_both_s"] = max(prefill(r), loaded * load_s)
        if plan["choice"] == "tail" and load_s and line is not None:  # the load and forward this turn will have
            part = (tokens - plan["split"]) / tokens * load_s
            if part > 0:
                plan["pace"] = (prefill(plan["split"] + new_tokens) / part, host / part)
        return plan
