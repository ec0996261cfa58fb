"""LayerLoader: restores a record into a cache layer by layer, ahead of compute (a thread on CPU, a side stream on CUDA)."""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable

import torch

from .streams import side_stream

#: loaders whose thread is running: stopped before the interpreter exits (a thread still inside a torch operation
#: at exit aborts the process: "terminate called without an active exception")
_running: "weakref.WeakSet[LayerLoader]" = weakref.WeakSet()
_running_lock = threading.Lock()


@atexit.register
def _stop_running_loaders() -> None:
    with _running_lock:
        loaders = list(_running)
    for loader in loaders:
        loader.cancel(timeout=10.0)  # a read stuck on a dead disk does not hold the exit forever


class LoadError(RuntimeError):
    """Restoring a layer failed (a corrupt tensor, an allocation failure): the cache recomputes instead."""


class LayerLoader:
    """Runs one job per layer, in layer order, ahead of the forward pass; :meth:`wait` blocks layer ``i``'s compute
    until job ``i`` is done (the verbs of vLLM's KV connector: ``start`` / ``wait(layer)``). A job may be ``None``:
    its layer was restored by the job before it (layers restored in a group).

    * CPU: a background thread runs the jobs; ``wait(i)`` waits for a per-layer ``threading.Event``.
    * CUDA: the jobs are enqueued at once on the process's restore stream (:func:`side_stream`), one CUDA event
      recorded after each; ``wait(i)`` makes the *current* stream wait for event ``i`` (no host
      synchronisation). With ``threaded=True`` (jobs that must first read a file) the jobs run in the thread
      and enqueue their device work on that stream.

    What the jobs read stays referenced by the loader (``keepalive``) as long as the loader lives (the cache
    drops it once every layer was waited for), so nothing is freed or reused while a copy is in flight.
    """

    def __init__(self, jobs: list[Callable[[], None]], device: torch.device, keepalive=None,
                 threaded: bool | None = None, ahead: int | None = None, before_release=None):
        """``ahead``: run only the first ``ahead`` jobs until :meth:`release` (a turn restored before it is served
        loads that many layers in advance, the rest once the turn starts); ``None`` = all at once.
        ``before_release``: called by :meth:`release` on the releasing thread before the held-back jobs run
        (it allocates what they write, and returns those tensors)."""
        self.before_release = before_release
        self.jobs = jobs
        self._go = threading.Event()
        self._limit = len(jobs) if ahead is None else max(0, min(int(ahead), len(jobs)))
        self._held = self._limit < len(jobs)  # jobs held back until release()
        if not self._held:
            self._go.set()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threaded = (not self.cuda) if threaded is None else threaded
        self.keepalive = keepalive
        self.n = len(jobs)
        self._done = [threading.Event() for _ in jobs]
        self._errors: list[BaseException | None] = [None] * self.n
        self._events: list = [None] * self.n
        self._waited = [False] * self.n
        self._last_wait = (None, None)  # (event, stream) of the last wait: the layers of a group wait once
        self._cancel = False
        self._thread: threading.Thread | None = None
        self.stream = None
        self.t_start = self.t_end = None  # host wall clock of the loading (CPU); CUDA: see cuda_start/cuda_end
        self.cpu_seconds = None  # CPU time of the loader thread's jobs (CPU: what seconds() reports, see there)
        self.cuda_start = self.cuda_end = None
        self.cuda_pause = self.cuda_resume = None  # around the wait for release() (held-back layers): not loading
        self.run_seconds = None  # host time of running (on CUDA: enqueuing) the jobs in start(), without a thread
        self.on_done: Callable[["LayerLoader"], None] | None = None     # called once every layer was waited for
        self.on_failure: Callable[[BaseException], None] | None = None  # called after a recovery
        self.on_cancel: Callable[[], None] | None = None  # called when the restore is discarded unfinished

    # ---- running ---------------------------------------------------------------------------------------------
    def start(self, written=()) -> "LayerLoader":
        """Start loading. ``written``: tensors allocated on the current stream that the jobs write (the cache's
        buffers): on CUDA their memory is not handed out again before the side stream is done with it."""
        self.t_start = time.perf_counter()
        if self.cuda:
            self.stream = side_stream(self.device, "restore")
            # the cache buffers were allocated on the current stream: the side stream writes them only after that
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for t in written:
                t.record_stream(self.stream)
            self.cuda_start = torch.cuda.Event(enable_timing=True)
            self.cuda_start.record(self.stream)
        if self.threaded:
            self._thread = threading.Thread(target=self._run_all, name="attnstore-loader", daemon=True)
            with _running_lock:
                _running.add(self)
            self._thread.start()
        else:
            t0 = time.perf_counter()
            self._run(0, self._limit)
            self.run_seconds = time.perf_counter() - t0
            if self._go.is_set():
                self._finish()
        return self

    def release(self) -> None:
        """Load the layers held back by ``ahead`` (the turn is being served now). Idempotent."""
        if self._go.is_set():
            return
        if self.before_release is not None:
            written = self.before_release()  # on the current stream of the releasing thread
            if self.cuda:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                for t in written:
                    t.record_stream(self.stream)
        self._go.set()
        if not self.threaded:
            self._run(self._limit, self.n)
            self._finish()

    @property
    def released(self) -> bool:
        return self._go.is_set()

    def _run_all(self) -> None:
        # inference mode is per thread: the cache's buffers may be inference tensors (cache_for or stage() called
        # under torch.inference_mode()), which a thread outside it may not write ("Inplace update to inference
        # tensor outside InferenceMode": every restore failed and was recomputed). Inside it, writing the normal
        # tensors of a cache made outside it is allowed too, and what the jobs make themselves is only read.
        try:
            with torch.inference_mode():
                self._run_all_jobs()
        finally:
            with _running_lock:
                _running.discard(self)

    def _run_all_jobs(self) -> None:
        c0 = time.thread_time()
        self._run(0, self._limit)
        c1 = time.thread_time()
        self._go.wait()
        c2 = time.thread_time()
        self._run(self._limit, self.n)
        self.cpu_seconds = (c1 - c0) + (time.thread_time() - c2)
        self._finish()

    @torch.no_grad()
    def _run(self, lo: int, hi: int) -> None:
        if self.cuda and lo < hi:
            with torch.cuda.stream(self.stream):  # once for the range: the jobs enqueue on the side stream
                if lo == self._limit and self._held:  # the held-back layers, released: the clock runs again
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record(self.stream)
                    if lo == 0:
                        self.cuda_start = ev
                    else:
                        self.cuda_resume = ev
                self._run_jobs(lo, hi)
                if lo == 0 and self._held and hi == self._limit:  # the rest waits for release(): the clock stops
                    self.cuda_pause = torch.cuda.Event(enable_timing=True)
                    self.cuda_pause.record(self.stream)
        else:
            self._run_jobs(lo, hi)

    def _run_jobs(self, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            job = self.jobs[i]
            if self._cancel:
                self._errors[i] = LoadError("cancelled")
                self._done[i].set()
                continue
            if job is None:  # restored by the job before it (a group of layers): done when that one is
                if self.cuda:
                    self._events[i] = self._events[i - 1]
                self._done[i].set()
                continue
            try:
                job()
                if self.cuda:
                    ev = torch.cuda.Event()
                    ev.record(self.stream)
                    self._events[i] = ev
            except BaseException as exc:  # reported to the layer that needs it, never lost
                self._errors[i] = exc
                self._cancel = True
            self._done[i].set()

    def _finish(self) -> None:
        if self.cuda:
            self.cuda_end = torch.cuda.Event(enable_timing=True)
            self.cuda_end.record(self.stream)
        self.t_end = time.perf_counter()

    # ---- waiting ---------------------------------------------------------------------------------------------
    def wait(self, i: int) -> None:
        """Block layer ``i``'s compute until its K/V are in place. Raises :class:`LoadError` if they never will be."""
        if i >= self.n or self._waited[i]:
            return
        if i >= self._limit:
            self.release()
        self._done[i].wait()
        err = self._errors[i]
        if err is not None:
            raise LoadError(f"layer {i}: {type(err).__name__}: {err}") from err
        ev = self._events[i]
        if self.cuda and ev is not None:
            stream = torch.cuda.current_stream(self.device)
            if ev is not self._last_wait[0] or stream != self._last_wait[1]:  # a group's layers share one event
                stream.wait_event(ev)
                self._last_wait = (ev, stream)
        self._waited[i] = True

    def wait_all(self) -> None:
        for i in range(self.n):
            self.wait(i)

    @property
    def finished(self) -> bool:
        return all(d.is_set() for d in self._done)

    def cancel(self, timeout: float | None = None) -> None:
        """Stop after the job in progress (its results are discarded by the caller); waits for the thread (at
        most ``timeout`` seconds)."""
        self._cancel = True
        if not self._go.is_set():  # held-back layers are never loaded: report them cancelled
            self._go.set()
            if not self.threaded:
                self._run(self._limit, self.n)
        if self._thread is not None:
            self._thread.join(timeout)

    def seconds(self) -> float | None:
        """How long the loading took, once finished and without waiting (``None`` until then).

        CUDA: the side stream's time from the start to the last job. A thread on a CPU: the thread's CPU time
        running the jobs. Its wall time would mostly be waiting — for the forward's threads on the same cores,
        for Python's lock while ``generate()`` prepares (measured: 2 MB from DRAM "took" 0.6 s, which made the
        cost model recompute the next turn), for the turn to start when it was restored ahead — none of which
        a load on its own pays. (Waits for a cold disk are not counted either.)"""
        if not self.finished:
            return None
        if self.cuda and self.cuda_end is not None:
            if not self.cuda_end.query():
                return None
            if self.cuda_pause is not None and self.cuda_resume is not None:  # without the wait for release()
                return (self.cuda_start.elapsed_time(self.cuda_pause)
                        + self.cuda_resume.elapsed_time(self.cuda_end)) / 1e3
            return self.cuda_start.elapsed_time(self.cuda_end) / 1e3
        if self.threaded and self.cpu_seconds is not None:
            return self.cpu_seconds
        return None if self.t_end is None else self.t_end - self.t_start
