"""AttentionStoreCache: the working KV cache on the compute device, with pre-RoPE keys kept for saving."""

from __future__ import annotations

import copy
import logging
import numbers
import threading
import time
import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .errors import NotPatchedError, UnsupportedModelError
from .patching import ModelPatch, patch_model
from .codec import decode
from .rope import apply_rope, apply_rope_into

#: The working cache grows its buffers by at least this many tokens (then by GROWTH_FACTOR): no copy per decode
#: step; a prompt's prefill and a restore leave this many free for the reply.
MIN_GROWTH = 256
#: geometric growth past MIN_GROWTH: amortised O(n) copying, at most 50% of a long cache's buffers unused (doubling
#: would leave up to 100%, and hold 3x the history while it copies)
GROWTH_FACTOR = 1.5
#: a sliding layer keeping the tokens that left its window (``extra_tokens``) joins them into one chunk once it
#: holds this many (one small copy per decode step otherwise)
FALLEN_CHUNKS = 32
#: A restore from page-locked DRAM on an accelerator handles consecutive full-attention layers in groups: one
#: host-to-device copy per layer tensor, then one set of kernels (copy into the cache, RoPE) per group rather
#: than per layer, so the host issues ~3x fewer operations (an eager forward at ~100 new tokens is launch-bound,
#: and the restore's launches come first). Groups grow 1, 1, 2, then this many layers: the first layers arrive
#: at once, and a group loads while the one before it computes.
GROUP_LAYERS = 4
#: devices on which restores are grouped (a CPU restore runs on a thread beside compute: per layer is cheaper)
GROUP_DEVICES = ("cuda",)
#: size groups by the turn's pace as well (see :func:`_group_starts`): when the forward is slower per layer than
#: the load (a launch-bound forward over ~100 new tokens and a short history), later groups grow as large as the
#: load can afford while staying ahead of compute, so the host issues fewer of them before the forward starts
GROUP_PACING = True
#: the share of the restore's own measured host time counted as a head start the load has on the forward
PACING_HEAD_SHARE = 0.5
#: at most this many bytes of record data per restore group (its device staging block, freed once the group is
#: in the cache): a group of 20 Llama-3-8B layers at 8,192 tokens would stage 1.3 GB
GROUP_MAX_BYTES = 256 << 20

log = logging.getLogger(__name__)


class _WaitsForRestore:
    """``keys``/``values`` of a layer still being restored in the background wait for it before anyone reads
    them (``generate()`` itself waits layer by layer in :meth:`AttentionStoreCache.update`)."""

    _waiter = None  # set while a LayerLoader owes this layer its K/V
    _stale = False  # the keys/values views are made when first read (a restore sizes many layers at once)

    @property
    def keys(self):
        if self._waiter is not None:
            self._waiter()
        if self._stale:
            self._sync_views()
        return self.__dict__.get("_keys_")

    @keys.setter
    def keys(self, value):
        self.__dict__["_keys_"] = value

    @property
    def values(self):
        if self._waiter is not None:
            self._waiter()
        if self._stale:
            self._sync_views()
        return self.__dict__.get("_values_")

    @values.setter
    def values(self, value):
        self.__dict__["_values_"] = value


class ChunkedLayer(_WaitsForRestore, DynamicLayer):
    """A full-attention layer whose keys, values and pre-RoPE keys live in buffers grown in chunks.

    ``DynamicLayer`` concatenates the whole history at every step (O(n^2) bytes copied over a reply); this layer
    writes new tokens in place and grows geometrically (:data:`GROWTH_FACTOR`, amortised O(n)). ``keys`` and
    ``values`` are views.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self._k = self._v = self._rk = None
        self._len = 0
        self._raw_len = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, 0, d))
        self._v = value_states.new_empty((b, value_states.shape[1], 0, value_states.shape[-1]))
        self._rk = key_states.new_empty((b, h, 0, d))
        self.keys, self.values = self._k, self._v
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        cap = self._k.shape[-2]
        if needed <= cap:
            return
        # the first allocation (a prompt's prefill) keeps MIN_GROWTH tokens free for the reply: no copy of the whole
        # history at the first decode step
        new_cap = max(needed + (MIN_GROWTH if cap == 0 else 0), int(cap * GROWTH_FACTOR), cap + MIN_GROWTH)

        def grow(buf, used):
            b, h, _, d = buf.shape
            out = buf.new_empty((b, h, new_cap, d))
            if used:
                out[:, :, :used] = buf[:, :, :used]
            return out

        self._k = grow(self._k, self._len)
        self._v = grow(self._v, self._len)
        self._rk = grow(self._rk, self._raw_len)

    def _writable(self) -> None:
        """Before an in-place write: buffers made under ``torch.inference_mode()`` (``cache_for`` called there),
        written outside it by a forward (a turn, a recovery, a recomputed masked prefix), become normal copies —
        torch refuses in-place writes to inference tensors there. Once; a restored cache's layer is complete by the
        time its forward writes it."""
        if self._k is not None and self._k.is_inference() and not torch.is_inference_mode_enabled():
            self._k, self._v, self._rk = self._k.clone(), self._v.clone(), self._rk.clone()
            self._sync_views()

    def _sync_views(self) -> None:
        self._stale = False
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]

    def update(self, key_states, value_states, *args, raw_keys=None, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self._len + n)
        self._writable()
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        if raw_keys is not None and self._raw_len == self._len:
            self._rk[:, :, self._raw_len : self._raw_len + n] = raw_keys
            self._raw_len += n
        self._len += n
        self._sync_views()
        return self.keys, self.values

    def restore(self, keys, values, raw_keys) -> None:
        """Start from restored state: ``keys`` already rotated for their positions, ``raw_keys`` pre-RoPE."""
        self.lazy_initialization(keys, values)
        self._len = self._raw_len = 0
        self._reserve(keys.shape[-2])
        self._writable()
        n = keys.shape[-2]
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._rk[:, :, :n] = raw_keys
        self._len = self._raw_len = n
        self._sync_views()

    def prepare(self, n: int, like_keys, like_values, capacity: int) -> None:
        """Size the buffers for ``n`` restored tokens (filled later by :meth:`fill`) and room up to ``capacity``."""
        self.device = like_keys.device
        b, h, _, d = like_keys.shape
        cap = max(n, capacity)
        self._k = like_keys.new_empty((b, h, cap, d))
        self._v = like_values.new_empty((b, like_values.shape[1], cap, like_values.shape[-1]))
        self._rk = like_keys.new_empty((b, h, cap, d))
        self.is_initialized = True
        self._len = self._raw_len = n
        self._sync_views()

    def adopt(self, n: int, k: torch.Tensor, v: torch.Tensor, rk: torch.Tensor) -> None:
        """:meth:`prepare` on buffers the caller allocated (``[B, H, capacity, D]`` views of one block that a group
        of layers restored together shares)."""
        self.device = k.device
        self._k, self._v, self._rk = k, v, rk
        self.is_initialized = True
        self._len = self._raw_len = n
        self._stale = True  # views made when read: a restore adopts every layer of a group before the forward

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the (keys, values, pre-RoPE keys) buffers :meth:`prepare` sized, for a restore to write."""
        n = self._len
        return self._k[:, :, :n], self._v[:, :, :n], self._rk[:, :, :n]

    def fill(self, keys, values, raw_keys) -> None:
        """Write the restored tokens into the buffers :meth:`prepare` sized."""
        self._writable()
        n = keys.shape[-2]
        self._k[:, :, :n].copy_(keys, non_blocking=True)
        self._v[:, :, :n].copy_(values, non_blocking=True)
        self._rk[:, :, :n].copy_(raw_keys, non_blocking=True)

    def get_seq_length(self) -> int:
        return self._len

    def raw_state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(pre-RoPE keys, values, first position) of every token this layer holds."""
        if self._raw_len != self._len:
            raise NotPatchedError("pre-RoPE keys are missing for some tokens: was the model patched during the forward?")
        return self._rk[:, :, : self._len], self._v[:, :, : self._len], 0

    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = int(tokens_to_remove)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if tokens_to_remove > 0:
            raise ValueError("crop with a positive value is not supported; pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._len = max(0, self._len + tokens_to_remove)
        self._raw_len = min(self._raw_len, self._len)
        self._sync_views()

    def reset(self) -> None:
        self._k = self._v = self._rk = None
        self._len = self._raw_len = 0
        self._stale = False
        self.keys = self.values = None
        self.is_initialized = False

    def _apply_batch(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v, self._rk = fn(self._k), fn(self._v), fn(self._rk)
            self._sync_views()

    def reorder_cache(self, beam_idx) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._apply_batch(lambda t: t[indices, ...])

    def offload(self):
        self._apply_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self._k.device != self.device:
            self._apply_batch(lambda t: t.to(self.device, non_blocking=True))


class SlidingLayer(_WaitsForRestore, DynamicSlidingWindowLayer):
    """transformers' own sliding-window layer (same masks, same window), plus the pre-RoPE keys of its window.

    ``extra_tokens`` > 0: the pre-RoPE keys and values of up to that many tokens that left the window during this
    cache's forwards are kept aside (attention never sees them) and stored with the window (:meth:`raw_state`),
    so a later turn that goes back that far (an undone or edited last message) finds the window it needs."""

    def __init__(self, sliding_window: int, extra_tokens: int = 0, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.raw_keys: torch.Tensor | None = None
        self._raw_ok = True
        self.extra_tokens = int(extra_tokens)
        self._fallen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pre-RoPE keys, values), oldest first

    def update(self, key_states, value_states, *args, raw_keys=None, **kwargs):
        keep = self.extra_tokens > 0 and raw_keys is not None and self._raw_ok
        prev_values = self.values if keep and self.is_initialized else None
        out = super().update(key_states, value_states, *args, **kwargs)
        if raw_keys is None or not self._raw_ok:
            self._raw_ok = False
            self._drop_fallen()
        else:
            prev = self.raw_keys if self.raw_keys is not None else raw_keys[:, :, :0]
            every = torch.cat([prev, raw_keys], dim=-2)
            self.raw_keys = self._align(every, self.cumulative_length)
            if keep:
                self._keep_fallen(every, prev_values, value_states)
        return out

    def _keep_fallen(self, every_raw, prev_values, value_states) -> None:
        """Keep the last :attr:`extra_tokens` of the tokens this update pushed out of the window: the first ``f`` of
        ``every_raw`` (what was held, then the new tokens), ``f`` = those no longer held."""
        f = every_raw.shape[-2] - self.__dict__["_keys_"].shape[-2]
        if f <= 0:
            return
        lo = max(0, f - self.extra_tokens)
        held_before = 0 if prev_values is None else prev_values.shape[-2]
        if f <= held_before:
            values = prev_values[:, :, lo:f]
        elif lo >= held_before:
            values = value_states[:, :, lo - held_before: f - held_before]
        else:
            values = torch.cat([prev_values[:, :, lo:], value_states[:, :, : f - held_before]], dim=-2)
        # copies: a view would keep the whole tensor it was cut from alive, one per decode step
        self._fallen.append((every_raw[:, :, lo:f].clone(), values.clone()))
        if self._fallen_len > 2 * self.extra_tokens or len(self._fallen) > FALLEN_CHUNKS:
            self._compact_fallen()

    @property
    def _fallen_len(self) -> int:
        """Tokens kept aside (at most :data:`FALLEN_CHUNKS` chunks to count)."""
        return sum(raw.shape[-2] for raw, _ in self._fallen)

    def _compact_fallen(self) -> None:
        """One chunk of the last :attr:`extra_tokens` kept tokens (amortised: a copy per many decode steps)."""
        chunks, n, extra = self._fallen, self._fallen_len, self.extra_tokens
        while len(chunks) > 1 and n - chunks[0][0].shape[-2] >= extra:  # chunks wholly older than that: dropped
            n -= chunks[0][0].shape[-2]
            chunks = chunks[1:]
        if len(chunks) > 1 or n > extra:
            raw, values = (torch.cat([c[i] for c in chunks], dim=-2) for i in (0, 1))
            if n > extra:  # (a copy, not a view holding the longer tensor)
                raw, values = raw[:, :, -extra:].clone(), values[:, :, -extra:].clone()
            chunks = [(raw, values)]
        self._fallen = chunks

    def _drop_fallen(self) -> None:
        self._fallen = []

    def _align(self, raw: torch.Tensor, raw_end: int) -> torch.Tensor:
        """Slice ``raw`` (ending at absolute position ``raw_end``) to the positions ``self.keys`` covers."""
        n = self.keys.shape[-2]
        start = (self.cumulative_length - n) - (raw_end - raw.shape[-2])
        return raw[:, :, start : start + n]

    def restore(self, keys, values, raw_keys, cumulative_length: int) -> None:
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.raw_keys = keys, values, raw_keys
        self.cumulative_length = cumulative_length
        self._raw_ok = True
        self._drop_fallen()

    def prepare(self, n: int, like_keys, like_values, cumulative_length: int) -> None:
        b, h, _, d = like_keys.shape
        self.restore(like_keys.new_empty((b, h, n, d)), like_values.new_empty((b, like_values.shape[1], n,
                                                                              like_values.shape[-1])),
                     like_keys.new_empty((b, h, n, d)), cumulative_length)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # not self.keys: that would wait for the restore that writes them
        return self.__dict__["_keys_"], self.__dict__["_values_"], self.raw_keys

    def crop(self, tokens_to_remove: int) -> None:
        end_before = self.cumulative_length
        super().crop(int(tokens_to_remove))
        if self.raw_keys is not None and self.keys is not None:
            self.raw_keys = self._align(self.raw_keys, end_before)
        self._drop_fallen()  # (they may no longer end where the window begins)

    def reset(self) -> None:
        super().reset()
        self.raw_keys = None
        self._raw_ok = True
        self._drop_fallen()

    def raw_state(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not self._raw_ok or (self.raw_keys is None and self.cumulative_length):
            raise NotPatchedError("pre-RoPE keys are missing for some tokens: was the model patched during the forward?")
        if self.keys is None or self.raw_keys is None:  # never updated: nothing held
            empty = torch.empty(0)
            return empty, empty, self.cumulative_length
        held = self.keys.shape[-2]
        if self._fallen_len:  # the tokens that left the window, then everything held: one run of positions
            self._compact_fallen()
            raw, values = self._fallen[0]
            n = held + raw.shape[-2]
            return (torch.cat([raw, self.raw_keys], dim=-2), torch.cat([values, self.values], dim=-2),
                    self.cumulative_length - n)
        n = min(held, self.sliding_window - 1)  # what the next forward needs: the window
        return self.raw_keys[:, :, held - n :], self.values[:, :, held - n :], self.cumulative_length - n

    def _apply_batch(self, fn) -> None:
        if self.raw_keys is not None:
            self.raw_keys = fn(self.raw_keys)
        self._fallen = [(fn(r), fn(v)) for r, v in self._fallen]

    def reorder_cache(self, beam_idx) -> None:
        super().reorder_cache(beam_idx)
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        self._apply_batch(lambda t: t[indices, ...])


def layer_kinds_for(model) -> list[int | None]:
    """Per decoder layer, the sliding window of the layer transformers' DynamicCache would pick, or ``None`` for
    a full-attention layer (``[]``: the config does not say; layers are made as the forward needs them)."""
    reference = DynamicCache(config=model.config)
    kinds = []
    for i, ref in enumerate(reference.layers):
        if isinstance(ref, DynamicSlidingWindowLayer):
            kinds.append(ref.sliding_window)
        elif type(ref) is DynamicLayer:
            kinds.append(None)
        else:
            raise UnsupportedModelError(f"layer {i} needs a {type(ref).__name__} cache, which attnstore-hf does not support")
    return kinds


def _layers_for(patch: ModelPatch, model, sliding_extra_tokens: int = 0) -> list:
    """One working layer per decoder layer, mirroring the layer kinds transformers' DynamicCache would pick (worked
    out once per model: building a reference cache costs more than a restore of a short history)."""
    if patch.layer_kinds is None:
        patch.layer_kinds = layer_kinds_for(model)
    return [ChunkedLayer() if w is None else SlidingLayer(sliding_window=w, extra_tokens=sliding_extra_tokens)
            for w in patch.layer_kinds]


class AttentionStoreCache(Cache):
    """A transformers ``Cache`` that keeps pre-RoPE keys so a conversation can be stored and restored exactly.

    Use it as ``model.generate(input_ids, past_key_values=cache)``; get one from
    :meth:`AttentionStore.cache_for`, which restores what the store holds for the session. Attributes:

    * ``reused_tokens`` — prompt tokens restored rather than prefilled.
    * ``prefix_ids`` — the token ids whose KV was restored (a prefix of the ``input_ids`` it was built for).
    * ``input_ids`` — the ids to hand to ``generate()``.
    """

    def __init__(self, model, *, session_id: str | None = None, sliding_extra_tokens: int = 0):
        self._patch: ModelPatch = patch_model(model)
        extra = sliding_extra_tokens
        if isinstance(extra, bool) or not isinstance(extra, numbers.Integral) or extra < 0:
            raise ValueError(f"sliding_extra_tokens must be an int >= 0, got {sliding_extra_tokens!r}")
        layers = _layers_for(self._patch, model, int(extra))
        if layers:
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=ChunkedLayer)
        self.session_id = session_id
        self._no_restore()
        self._lost_turn = False
        self.input_ids: torch.Tensor | None = None
        self.load_seconds = 0.0
        self.truncated = 0              # tokens dropped by truncation for this turn
        self._model = model
        self._loader = None                       # a LayerLoader still restoring layers (layer-wise restore)
        self._snapshots: list = []                # pending saves reading this cache (Snapshot objects)
        self.restore_plan: dict | None = None     # what cache_for chose for this turn: load / recompute / both
        self.recomputed_tokens = 0                # restored tokens recomputed after a failed layer-wise load
        self.host_ms: dict[str, float] = {}       # host time of cache_for's phases, ms (where a lookup's time goes)
        self.forwards = 0                          # decoder forwards run on this cache
        self._tally: dict[str, float] = {}         # the store's counters for this turn, added once it is served
        self._claim = threading.Lock()             # the first forward vs discard(): a cache in use is never emptied
        self._claimed = False
        self._fed: list[torch.Tensor] | None = []  # ids of each forward (batch 1), to check what save() is given
        self._base_ids: list[int] = []             # ids of the tokens the cache held before those forwards
        self.masked = False  # a forward ran with an attention mask hiding tokens: the K/V depend on that mask
        self.record_turn = 0  # the turn of the record cache_for found (0: none); a save of this cache is one more
        self.fingerprint: str | None = None  # the model's fingerprint when cache_for made this cache
        self._weights = None                 # and the weights' stamp then (see ModelPatch._weights_stamp)

    # ---- layer-wise restore -------------------------------------------------------------------------------------
    def _wait_layer(self, layer_idx: int) -> None:
        from .pipeline.loader import LoadError

        loader = self._loader
        if loader is None:
            return
        try:
            loader.wait(layer_idx)
        except LoadError as exc:
            self._recover(exc, loader)
        if layer_idx < len(self.layers):
            self.layers[layer_idx]._waiter = None
        if self._loader is loader and all(loader._waited):
            self._loader_done(loader)

    def _loader_done(self, loader) -> None:
        self._loader = None
        for layer in self.layers:
            layer._waiter = None
        if loader.on_done is not None:
            loader.on_done(loader)

    def wait_loaded(self) -> None:
        """Block until every restored layer is in place (``generate()`` never needs this: each layer waits for
        itself). Called before anything reads or changes the whole cache."""
        while self._loader is not None:
            loader = self._loader
            for i in range(len(self.layers)):
                if self._loader is not loader:
                    break
                self._wait_layer(i)

    def discard(self) -> bool:
        """This cache will not be used (a turn restored ahead of time that was not served): stop restoring and let
        go of what the restore holds. The cache is empty afterwards (a plain cache: a forward on it computes
        everything). Returns ``False``, doing nothing, if a forward already ran or started on it (the caller ran
        the cache ``stage()`` returned: theirs)."""
        with self._claim:
            if self._claimed:
                return False
            self._discard()
            return True

    def _discard(self) -> None:
        loader = self._loader
        whole = loader is not None and loader.released and loader.finished and not any(loader._errors)
        if whole:
            self.wait_loaded()  # everything arrived and was verified: finish as a used restore would
        else:
            self._abandon_restore()
        lost = self.carried
        self.reset()  # a plain cache now: what cache_for set up for the turn goes too
        self._no_restore()
        # its ids are those a truncation kept, and the K/V it restored carried the dropped context: computed afresh
        # from those ids the turn would give another answer than the same turn served (see _check_forward)
        self._lost_turn = lost

    def _no_restore(self) -> None:
        """The turn fields of a cache that restores nothing (a new one, or a discarded one)."""
        self.reused_tokens = 0
        self.prefix_ids: list[int] = []
        self.source: str | None = None  # tier the restored record came from ("dram", "disk", "redis") or None
        self.carried = False            # restored K/V hold context truncation dropped (not recomputable from ids)
        self.user_ids: list[int] | None = None   # the ids cache_for was given (the user's coordinates)
        self.turn_ids: list[int] | None = None   # the same in the cache's coordinates (what input_ids holds)
        self.origin_ids: list[int] = []           # user-coordinate ids of a record restored from a truncated one
        self._expect_first: int | None = None     # new tokens the first forward must bring (guards truncation)

    def _abandon_restore(self) -> None:
        """Stop a layer-wise restore still running and let go of what it holds; no layer waits for it any more."""
        loader, self._loader = self._loader, None
        if loader is not None:
            loader.cancel()
            if loader.stream is not None:  # the buffers are freed on the current stream: after the side stream
                torch.cuda.current_stream(loader.device).wait_stream(loader.stream)
            if loader.on_cancel is not None:
                loader.on_cancel()
        for layer in self.layers:
            layer._waiter = None

    def _wait_snapshot(self) -> None:
        """Before the cache changes in place: every save still to read it (an asynchronous one queued behind
        others, a blocking one taken since) has read it."""
        while self._snapshots:
            self._snapshots.pop(0).wait_copied()

    @torch.no_grad()
    def prefill_apart(self, ids: torch.Tensor, **kwargs) -> "AttentionStoreCache":
        """Run the decoder over ``ids`` into a new cache, possibly in the middle of this cache's own forward: the
        pre-RoPE keys this forward has captured but not yet taken are kept aside meanwhile. ``kwargs`` go to the
        decoder (``attention_mask``, ``position_ids``)."""
        fresh = AttentionStoreCache(self._model)
        ids = ids.to(next(self._model.parameters()).device)  # (cache_for may have been given the ids on the host)
        patch = self._patch
        stash = patch.stash
        saved, capturing = dict(stash), patch.capturing
        stash.clear()
        try:
            patch.adapter.decoder(self._model)(input_ids=ids, past_key_values=fresh, use_cache=True, **kwargs)
        finally:
            stash.clear()
            stash.update(saved)
            patch.capturing = capturing
        return fresh

    @torch.no_grad()
    def _recover(self, exc: Exception, loader) -> None:
        """``loader`` could not restore a layer after the forward started: recompute the restored prefix of every
        layer still pending in a nested forward (exact), so the turn goes on with the right answer."""
        self._loader = None
        loader.cancel()
        for layer in self.layers:
            layer._waiter = None
        log.warning(
            "session %r: restoring the stored KV failed mid-forward (%s); recomputing the %d restored tokens",
            self.session_id, exc, self.reused_tokens)
        if loader.stream is not None:
            torch.cuda.current_stream(loader.device).wait_stream(loader.stream)
        tmp = self.prefill_apart(self.input_ids[:, : self.reused_tokens])
        self.recomputed_tokens = self.reused_tokens
        for i, (work, fresh) in enumerate(zip(self.layers, tmp.layers)):
            if loader._waited[i]:
                continue  # already restored and used by this forward
            if isinstance(work, SlidingLayer):
                work.restore(fresh.keys, fresh.values, fresh.raw_keys, fresh.cumulative_length)
            else:
                work.fill(fresh.keys, fresh.values, fresh.raw_state()[0])
        if loader.on_failure is not None:
            loader.on_failure(exc)

    # ---- what each forward is given ----------------------------------------------------------------------------
    def _on_forward(self, ids: torch.Tensor | None, kwargs: dict) -> None:
        """Called by the model patch before each decoder forward on this cache. The first forward of a turn is
        checked against the conversation ``cache_for`` was given (other ids would meet K/V of another text); a
        restored one-row cache is repeated for a forward of several rows (beam search, several return
        sequences: the rows share the prompt); restored tokens an attention mask hides (padding) are recomputed
        under that mask; and the ids are noted, so that :meth:`held_ids` can tell ``save()`` what the K/V are of.
        A first forward that passes these checks claims the cache: :meth:`discard` leaves it alone from then on.
        """
        if self.forwards == 0 and not self._claimed:
            with self._claim:  # after a discard() under way (which empties the cache), never during one
                self._check_forward(ids, kwargs)
                self._claimed = True  # (not if the checks raised: the cache is as it was)
        else:
            self._check_forward(ids, kwargs)

    def _check_forward(self, ids: torch.Tensor | None, kwargs: dict) -> None:
        if kwargs.get("use_cache") is False:  # generate() would feed the whole sequence at every step, appended
            raise ValueError("use_cache=False with an AttentionStoreCache: the cache would be fed every token again "
                             "at each step (a wrong answer); drop past_key_values, or leave use_cache on")
        first = self.forwards == 0
        if first and self._lost_turn:
            raise ValueError(
                f"the turn of session {self.session_id!r} restored ahead of time (stage()) was dropped by the store "
                "before it ran (a save, drop or close of the session, or more than stage_sessions staged turns); "
                "its conversation was truncated and the restored K/V carried what was dropped, so computing its ids "
                "afresh would give another answer: get the turn again with store.cache_for()")
        restored = first and self.turn_ids is not None
        past = self.reused_tokens if restored else self.get_seq_length()
        if ids is None:  # inputs_embeds: what they stand for cannot be checked against the stored tokens
            if restored and past:
                raise ValueError(
                    f"this cache holds {past} restored tokens of session {self.session_id!r}, which cannot be "
                    "checked against inputs_embeds: pass input_ids (cache.input_ids) to generate() on a restored "
                    "cache, or use a fresh cache (a miss) for embeddings")
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return
            rows, n = embeds.shape[0], embeds.shape[1]
        else:
            rows, n = ids.shape[0], ids.shape[-1]
        if n == 0 and self.turn_ids is not None:  # else a reshape of 0 elements fails deep inside
            raise ValueError(f"the forward got no new tokens: this cache already holds {self.get_seq_length()} "
                             "tokens of the conversation. Pass the whole conversation, cache.input_ids (history + "
                             "new message), to generate(), not only the new message")
        held_rows = self._rows() if past else rows
        if held_rows != rows and held_rows != 1:
            raise ValueError(f"the forward has {rows} rows but this cache holds {held_rows} (left by beam search or "
                             "several return sequences): save the turn and restore it with store.cache_for to go on")
        if restored and ids is not None:
            self._check_turn(ids, past)  # raises before anything changed: generate() can be called again
        mask = kwargs.get("attention_mask")
        # a restored turn's first forward had its ids checked above: its positions need no read-back (a host sync)
        self._check_span(mask, None if restored and ids is not None else kwargs.get("position_ids"), past, n)
        loader = self._loader
        if first and loader is not None and not loader.released:
            loader.release()  # a staged turn run directly (not handed over by cache_for): its held-back layers
            # must be sized before the forward builds its masks from them
        self.forwards += 1
        if (isinstance(mask, torch.Tensor) and mask.dim() == 2 and (first or n > 1) and not self.masked
                and bool((mask == 0).any())):  # decode steps only append ones to the mask: not checked
            self.masked = True
            if restored and past and bool((mask[:, :past] == 0).any()):
                self._recompute_masked(mask, kwargs.get("position_ids"), past, n)
        if rows > 1 and past and held_rows == 1:
            self.batch_repeat_interleave(rows)
        if self._fed is not None:
            if ids is not None and rows == 1:
                self._fed.append(ids[0])
            else:  # embeddings, or beams (their replies differ: save() keeps the prompt they share)
                self._fed = None

    def _check_turn(self, ids: torch.Tensor, past: int) -> None:
        host = ids.tolist()  # a few ids to the host, once a turn
        row = host[0]
        if any(r != row for r in host[1:]):
            raise ValueError(f"the forward got {len(host)} different sequences, but this cache holds one "
                             f"conversation (session {self.session_id!r}): use one cache per conversation")
        expect = self.turn_ids[past: past + len(row)]
        if row[: len(expect)] != expect:
            if past and row[:past] == self.turn_ids[:past]:
                raise ValueError(
                    f"the forward was given the whole sequence again, although this cache already holds its first "
                    f"{past} tokens (session {self.session_id!r}). generate() slices cache.input_ids itself; a direct "
                    f"model call takes cache.input_ids[:, {past}:]. transformers' assisted decoding and prompt "
                    "lookup do this on any prefilled cache (DynamicCache then silently computes a wrong answer): use "
                    "them on a fresh cache, e.g. StoreConfig(restore_mode='recompute'), and take a new one from "
                    "store.cache_for (they may have cropped this one)")
            raise ValueError(
                f"generate() got other ids than the conversation cache_for() was given (session "
                f"{self.session_id!r}): the tokens after the {past} in the cache differ; pass cache.input_ids "
                "(history + new message, as kept after any truncation), not only the new message")

    def _check_span(self, mask, position_ids, past: int, n: int) -> None:
        """generate() given no more ids than the cache holds (the same prompt again, on a used cache) slices them
        wrongly and feeds a stretch of them again: a wrong answer. The forward's own arguments show it — a 2-D
        mask spans every key (held + new), and without one the positions of new tokens follow the held ones."""
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            span, what = mask.shape[-1], "the attention mask covers"
        elif n > 1 and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
                and position_ids.shape[-1] == n:  # prefill forwards only: a decode step's is not read back
            span, what = int(position_ids[0, -1]) + 1, "the position ids reach"
        else:
            return
        if span != past + n:
            raise ValueError(
                f"{what} {span} tokens, but this cache holds {past} and the forward adds {n}: generate() was given a "
                "sequence that does not continue the one this cache holds (the same prompt again? transformers then "
                "feeds a wrong slice of it). Pass the conversation so far plus the new tokens, or take a new cache "
                "from store.cache_for")

    def _rows(self) -> int:
        for layer in self.layers:
            t = layer._k if isinstance(layer, ChunkedLayer) else layer.__dict__.get("_keys_")
            if t is not None:
                return t.shape[0]
        return 1

    @torch.no_grad()
    def _recompute_masked(self, mask: torch.Tensor, position_ids, past: int, n: int) -> None:
        """The attention mask hides some restored tokens (padding): their K/V, and those of the tokens after
        them, depend on it, and stored K/V were computed without it. Recompute the restored tokens under the mask
        (exact; the restore is abandoned)."""
        prefix_pos = None
        if position_ids is not None:  # the positions generate() derives from the mask, for the prefix as well
            derived = mask[:1].long().cumsum(-1) - 1
            derived.masked_fill_(mask[:1] == 0, 1)
            pos = position_ids[:1].to(derived.device)
            if torch.equal(derived[:, past: past + n], pos):
                prefix_pos = derived[:, :past]
            elif not torch.equal(torch.arange(past, past + n, device=pos.device).unsqueeze(0), pos):
                raise ValueError("position_ids that are neither the default nor derived from the attention mask "
                                 "are not supported on a restored cache: use a fresh cache (store.cache_for is "
                                 "given the conversation, generate() the same ids)")
        log.warning("session %r: the attention mask hides some of the %d restored tokens (padding); recomputing "
                    "them under that mask", self.session_id, past)
        self._abandon_restore()
        fresh = self.prefill_apart(self.input_ids[:1, :past].to(mask.device), attention_mask=mask[:1, :past],
                                   **({} if prefix_pos is None else {"position_ids": prefix_pos}))
        for work, got in zip(self.layers, fresh.layers):
            if isinstance(work, SlidingLayer):
                work.restore(got.keys, got.values, got.raw_keys, got.cumulative_length)
            else:
                work.restore(got.keys, got.values, got.raw_state()[0])
        self.recomputed_tokens = past

    def held_ids(self) -> list[int] | None:
        """The ids of the tokens whose K/V this cache holds, as its forwards were given them (``None`` if unknown:
        a forward of several rows or of ``inputs_embeds``)."""
        if self._fed is None:
            return None
        return self._base_ids + (torch.cat(self._fed).tolist() if self._fed else [])

    def _trim_fed(self) -> None:
        """After a crop: only the first ``get_seq_length()`` noted ids are still held."""
        if self._fed is None:
            return
        length = self.get_seq_length()
        if length <= len(self._base_ids):
            self._base_ids, self._fed = self._base_ids[:length], []
        elif self._fed:
            self._fed = [torch.cat(self._fed)[: length - len(self._base_ids)]]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._snapshots:
            self._wait_snapshot()
        if self._loader is not None:
            self._wait_layer(layer_idx)
        if self._expect_first is not None:
            expected, self._expect_first = self._expect_first, None
            if key_states.shape[-2] != expected:
                raise ValueError(
                    f"the conversation was truncated or remapped for this turn: pass cache.input_ids to generate() "
                    f"(expected {expected} new tokens after the {self.reused_tokens} restored, got "
                    f"{key_states.shape[-2]})"
                )
        raw = self._patch.take(layer_idx)
        if raw is not None and raw.shape != key_states.shape:
            raw = None
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        return self.layers[layer_idx].update(key_states, value_states, *args, raw_keys=raw, **kwargs)

    def raw_layers(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per layer: (pre-RoPE keys, values, absolute position of the first token held)."""
        self.wait_loaded()
        return [layer.raw_state() for layer in self.layers]

    def _settled(self) -> None:
        """Wait for a layer-wise restore and an asynchronous save before the whole cache is changed."""
        self.wait_loaded()
        self._wait_snapshot()

    def crop(self, *args, **kwargs):
        self._settled()
        out = super().crop(*args, **kwargs)
        self._trim_fed()
        return out

    def reset(self, *args, **kwargs):
        self._settled()
        out = super().reset(*args, **kwargs)
        self._fed, self._base_ids, self.masked = [], [], False
        return out

    def reorder_cache(self, *args, **kwargs):
        self._settled()
        self._fed = None
        return super().reorder_cache(*args, **kwargs)

    def batch_repeat_interleave(self, *args, **kwargs):
        self._settled()
        self._fed = None
        return super().batch_repeat_interleave(*args, **kwargs)

    def batch_select_indices(self, *args, **kwargs):
        self._settled()
        self._fed = None
        return super().batch_select_indices(*args, **kwargs)

    @property
    def layer_kinds(self) -> list[str]:
        return ["sliding" if isinstance(layer, SlidingLayer) else "full" for layer in self.layers]

    def __deepcopy__(self, memo):
        """A copy that goes its own way (``copy.deepcopy``, as transformers' own caches allow: to branch a
        conversation, generate two replies from one history): its own K/V, the model and its capture hooks shared.
        A layer-wise restore still running and a save still reading this cache are waited for first."""
        self._settled()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        fresh = {"_claim": threading.Lock(), "_loader": None, "_snapshots": [], "_tally": {}}
        for name, value in self.__dict__.items():
            if name in ("_patch", "_model"):
                new.__dict__[name] = value
            elif name in fresh:
                new.__dict__[name] = fresh[name]
            else:
                new.__dict__[name] = copy.deepcopy(value, memo)
        return new

    def __repr__(self):
        return (f"AttentionStoreCache(session_id={self.session_id!r}, seq_length={self.get_seq_length()}, "
                f"reused_tokens={self.reused_tokens}, layers={len(self.layers)})")


def reusable_length(record, cache: AttentionStoreCache, input_ids: list[int]) -> int:
    """How many leading tokens of ``input_ids`` can be restored from ``record`` (0 = miss).

    The longest common prefix of the record's ids and ``input_ids``, at most ``len(input_ids) - 1`` (generate()
    must prefill at least one token), and only if every sliding layer still holds the window that prefix needs.
    """
    stored = record.token_ids
    n = min(len(stored), len(input_ids) - 1)
    if stored[:n] == input_ids[:n]:  # the usual case, compared at C speed
        r = n
    else:
        lo, hi = 0, n  # stored[:lo] matches, stored[:hi] does not: bisect on prefix equality
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if stored[lo:mid] == input_ids[lo:mid]:
                lo = mid
            else:
                hi = mid
        r = lo
    if len(record.layers) != len(cache.layers):
        return 0
    for lay, work in zip(record.layers, cache.layers):
        if isinstance(work, SlidingLayer):
            need_from = max(0, r - (work.sliding_window - 1))
            if need_from < lay.start:
                return 0
        elif lay.start != 0 or lay.kind != "full":
            return 0
    return r


def window_indices(record, cache: AttentionStoreCache, keep: torch.Tensor) -> list[torch.Tensor] | None:
    """Per layer, which of the kept record tokens (``keep``: token indices, ascending) the layer must hold, as
    indices into that layer's stored tensors; ``None`` if a sliding layer no longer has them."""
    out = []
    first, last = (int(keep[0]), int(keep[-1])) if keep.numel() else (0, -1)
    for lay, work in zip(record.layers, cache.layers):
        idx, lo = keep, first
        if isinstance(work, SlidingLayer):
            cut = max(0, keep.numel() - (work.sliding_window - 1))
            idx = keep[cut:]
            lo = int(idx[0]) if idx.numel() else 0
        if idx.numel() and (lo - lay.start < 0 or last - lay.start >= lay.length):
            return None
        out.append(idx - lay.start if lay.start else idx)
    return out


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _group_starts(n_layers: int, pace: tuple[float, float] | None = None) -> set[int]:
    """Indices where a restore group may start: 0, 1, 2, 4, then every :data:`GROUP_LAYERS` (the fixed schedule).

    ``pace = (r, head)`` (from the cost model's plan, ``"pace"``): ``r`` = the forward's time per layer over the
    load's, ``head`` = the host work between issuing the restore and starting the forward, over the whole load's
    time (the load's head start; :data:`PACING_HEAD_SHARE` of it is counted). Layer ``j`` is needed about
    ``H + j * r`` layers' worth of loading after the load began (``H = head * n_layers * share``), so a group that
    starts at layer ``s`` may run up to layer ``H + s * r`` and still be in place when compute reaches its first
    layer: groups grow geometrically (ratio ``r``). Never finer than the fixed schedule; with ``r <= 1`` (the load
    is the slower side) and no head start, the fixed schedule itself.
    """
    starts, i, k = set(), 0, 0
    r, head = pace if pace is not None else (0.0, 0.0)
    head *= n_layers * PACING_HEAD_SHARE
    while i < n_layers:
        starts.add(i)
        step = (1, 1, 2)[k] if k < 3 else max(1, GROUP_LAYERS)
        reach = int(head + i * r) if i else 1  # the first layer is awaited whatever the pace: alone
        i = max(i + step, reach)
        k += 1
    return starts


def restore_jobs(cache: AttentionStoreCache, model, record, keep: torch.Tensor, positions: torch.Tensor,
                 total_len: int, *, into_cache: bool = True, out: list | None = None, before=None,
                 defer_from: int | None = None, sizers: list | None = None, pace: tuple[float, float] | None = None):
    """One job per layer that restores the record tokens ``keep`` (indices, ascending), keys rotated for
    ``positions``. ``into_cache``: the cache layers are sized now (on the calling thread) and each job fills its
    layer; otherwise each job appends ``(keys, values, raw_keys)`` to ``out[i]``. ``None`` if a sliding layer
    lacks the window the kept tokens need. ``before(i)``, if given, runs first in job ``i`` (it reads and
    verifies layer ``i`` of a record opened lazily from disk). ``defer_from``: the cache buffers of layers from
    that index on are not allocated now; a function per group that allocates them is appended to ``sizers``
    (to run before those jobs: a turn restored ahead of time holds device memory only for the layers it loads).
    ``pace``: see :func:`_group_starts` (grouped restores only).

    On the devices in :data:`GROUP_DEVICES`, a resident record's consecutive full-attention layers are restored
    in groups (see :data:`GROUP_LAYERS`): the group's first job does every layer of it and the others are
    ``None`` (done once the job before them is).
    """
    per_layer = window_indices(record, cache, keep)
    if per_layer is None:
        return None
    patch = cache._patch
    device, dtype = _device_dtype(model)
    span = max(total_len, int(positions.max()) + 1 if positions.numel() else 0)
    contiguous = bool(keep.numel()) and int(keep[-1]) - int(keep[0]) + 1 == keep.numel()
    # RoPE tables on the calling thread (kept across turns for static rope types), before the loader starts:
    # on CUDA its side stream waits for the current one, so it sees them
    tables = {}
    for i, ltype in enumerate(patch.layer_types[: len(record.layers)]):
        if ltype not in tables:
            tables[ltype] = patch.rope_tables(model, i, span, dtype, device)
    p0 = int(positions[0]) if positions.numel() else 0
    in_order = bool(positions.numel()) and torch.equal(positions, torch.arange(p0, p0 + positions.numel()))
    if in_order:  # the common case: cos/sin are slices of the tables, no gather and no index tensor on the device
        pos_dev = None
    elif device.type == "cuda":  # without a pageable host-to-device copy (it would block the host on the stream)
        pos_dev = positions.pin_memory().to(device, non_blocking=True)
    else:
        pos_dev = positions

    def cos_sin(i, n):
        """cos/sin of layer ``i``'s type for the last ``n`` kept positions (a layer may hold only the last ones)."""
        cos, sin = tables[patch.layer_types[i]]
        if pos_dev is None:
            first = p0 + positions.numel() - n
            return cos[:, first:first + n], sin[:, first:first + n]
        pos = pos_dev[pos_dev.numel() - n:]
        return cos[:, pos], sin[:, pos]

    def job(i, lay, work, local):
        if before is not None:
            before(i)
        n = local.numel()
        if contiguous:  # slicing keeps the common case copy-free until the device transfer
            a = int(local[0]) if n else 0
            sel = slice(a, a + n)
        else:
            sel = local
        parts = lay.parts()
        cos, sin = cos_sin(i, n)
        if into_cache:  # straight into the cache's buffers: pre-RoPE keys and values copied, keys rotated there
            k_dst, v_dst, rk_dst = work.targets()
            hk = hv = None
            if record.codec == "none" and parts["k"].dtype == dtype and isinstance(sel, slice):
                hk, hv = parts["k"][:, :, sel], parts["v"][:, :, sel]
                if device.type == "cuda" and not (hk.is_contiguous() and hv.is_contiguous()):
                    hk = hv = None  # a strided slice of page-locked memory would be copied synchronously
            if hk is None:  # narrow or quantized data moves to the device first, then is decoded there
                hk, hv = decode(parts, record.codec, dtype, sel, device, lay.start)
            rk_dst.copy_(hk, non_blocking=True)
            v_dst.copy_(hv, non_blocking=True)
            apply_rope_into(k_dst, rk_dst, cos, sin)
        else:
            raw, values = decode(parts, record.codec, dtype, sel, device, lay.start)
            out[i] = (apply_rope(raw, cos, sin), values, raw)

    def group_job(group, k_buf, v_buf, rk_buf):
        """Every layer of ``group``: each record tensor copied into one device block (a plain copy, no kernel),
        then the pre-RoPE keys and values copied into the group's cache buffers and the keys rotated there, one
        kernel set for the group. The same operations as :func:`job`, elementwise, so the result is identical."""
        n = per_layer[group[0]].numel()
        a = int(per_layer[group[0]][0])
        cos, sin = cos_sin(group[0], n)
        layers = [record.layers[i] for i in group]
        if a == 0 and n == layers[0].keys.shape[2]:  # whole layers (the usual case): no slicing
            src_k, src_v = [lay.keys for lay in layers], [lay.values for lay in layers]
        else:
            src_k = [lay.keys[:, :, a:a + n] for lay in layers]
            src_v = [lay.values[:, :, a:a + n] for lay in layers]
        tk = torch.empty((len(group),) + tuple(src_k[0].shape), dtype=dtype, device=device)
        tv = torch.empty((len(group),) + tuple(src_v[0].shape), dtype=dtype, device=device)
        torch._foreach_copy_(list(tk.unbind(0)) + list(tv.unbind(0)), src_k + src_v, non_blocking=True)
        rk_buf[:, :, :, :n].copy_(tk)
        v_buf[:, :, :, :n].copy_(tv)
        apply_rope_into(k_buf[:, :, :, :n], tk, cos, sin)

    groupable = (into_cache and before is None and device.type in GROUP_DEVICES and pos_dev is None and contiguous
                 and record.codec == "none")

    def signature(i, lay, work, local):
        """Layers with equal signatures (not None) can be restored in one group."""
        n = local.numel()
        if not (n and isinstance(work, ChunkedLayer)):
            return None
        k, v = lay.keys, lay.values
        if k.dtype != dtype or v.dtype != dtype:
            return None
        a = first - lay.start  # a full-attention layer's indices are `keep` itself, shifted by its start
        if a == 0 and n == k.shape[2]:  # the whole stored layer (the usual case)
            if not (k.is_contiguous() and v.is_contiguous()):
                return None
        elif not (k[:, :, a:a + n].is_contiguous() and v[:, :, a:a + n].is_contiguous()):
            return None
        return patch.layer_types[i], k.shape, v.shape, a, n

    first = int(keep[0]) if groupable and keep.numel() else 0
    groups: list[list[int]] = []
    starts = _group_starts(len(record.layers), pace if GROUP_PACING else None)
    if defer_from is not None:
        starts.add(defer_from)  # no group spans the layers loaded ahead and the ones held back
    prev, staged = None, 0
    for i, (lay, work, local) in enumerate(zip(record.layers, cache.layers, per_layer)):
        sig = signature(i, lay, work, local) if groupable else None
        size = 2 * local.numel() * lay.keys.shape[1] * lay.keys.shape[3] * lay.keys.element_size() if sig else 0
        if sig is not None and sig == prev and i not in starts and staged + size <= GROUP_MAX_BYTES:
            groups[-1].append(i)
            staged += size
        else:
            groups.append([i])
            staged = size
        prev = sig

    def size_group(group, holder):
        """One block per buffer kind for the group; each layer's buffers are views of it."""
        lay = record.layers[group[0]]
        n = per_layer[group[0]].numel()
        cap = max(n, total_len) + MIN_GROWTH  # room for the reply, as _reserve leaves it
        b, h, _, d = lay.keys.shape
        k_buf = torch.empty((len(group), b, h, cap, d), dtype=dtype, device=device)
        rk_buf = torch.empty_like(k_buf)
        v_buf = torch.empty((len(group), b, lay.values.shape[1], cap, lay.values.shape[3]), dtype=dtype,
                            device=device)
        for j, i in enumerate(group):
            cache.layers[i].adopt(n, k_buf[j], v_buf[j], rk_buf[j])
        holder["bufs"] = (k_buf, v_buf, rk_buf)

    def size_layer(i):
        lay, work, local = record.layers[i], cache.layers[i], per_layer[i]
        heads, dim = lay.keys.shape[1], lay.keys.shape[3]
        like_k = torch.empty((1, heads, 0, dim), dtype=dtype, device=device)
        like_v = torch.empty((1, lay.values.shape[1], 0, lay.values.shape[3]), dtype=dtype, device=device)
        if isinstance(work, SlidingLayer):
            work.prepare(local.numel(), like_k, like_v, cumulative_length=keep.numel())
        else:
            work.prepare(local.numel(), like_k, like_v, capacity=total_len + MIN_GROWTH)

    jobs = []
    for group in groups:
        if len(group) > 1:
            holder: dict = {}
            size = (lambda g=group, h=holder: size_group(g, h))
            jobs.append(lambda g=group, h=holder: group_job(g, *h["bufs"]))
            jobs += [None] * (len(group) - 1)
        else:
            i = group[0]
            size = (lambda i=i: size_layer(i)) if into_cache else None
            lay, work, local = record.layers[i], cache.layers[i], per_layer[i]
            jobs.append(lambda i=i, lay=lay, work=work, local=local: job(i, lay, work, local))
        if size is None:
            continue
        if defer_from is not None and group[0] >= defer_from:
            sizers.append(size)  # sized when the held-back layers are released (the turn starts)
        else:
            size()
    if into_cache:
        cache.reused_tokens = keep.numel()
    return jobs


def _buffers(cache: AttentionStoreCache, lo: int = 0) -> list[torch.Tensor]:
    """The tensors a layer-wise restore writes (of layers ``lo`` on)."""
    out, seen = [], set()
    for layer in cache.layers[lo:]:
        names = ("_k", "_v", "_rk") if isinstance(layer, ChunkedLayer) else ("_keys_", "_values_", "raw_keys")
        for t in (layer.__dict__.get(n) for n in names):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()  # layers restored in a group share a block: once is enough
                if ptr not in seen:
                    seen.add(ptr)
                    out.append(t)
    return out


@torch.no_grad()
def restore(cache: AttentionStoreCache, model, record, keep: torch.Tensor, positions: torch.Tensor,
            total_len: int, *, layerwise: bool = False, before=None, ahead: int | None = None,
            threaded: bool = False, pace: tuple[float, float] | None = None) -> bool:
    """Fill ``cache`` with the record tokens ``keep`` (indices, ascending), their keys rotated for ``positions``.

    Without truncation ``keep == positions == arange(reuse)``. With positional-encoding-decoupled truncation,
    ``keep`` skips the dropped tokens and ``positions`` re-embeds the kept ones contiguously. ``layerwise``: the
    layers are filled in the background, layer *i* before layer *i* computes (see :class:`LayerLoader`);
    ``ahead``: only that many layers are loaded before the forward asks for them (a turn restored early);
    ``threaded``: issue the restore from the loader's thread on CUDA too (else only to read the disk);
    ``pace``: how fast compute goes through the layers against the load, to size restore groups (see
    :func:`_group_starts`).
    Returns ``False`` (cache untouched) if a sliding layer does not hold what it needs.
    """
    t0 = time.perf_counter()
    defer = ahead if layerwise and ahead is not None and ahead < len(cache.layers) else None
    sizers: list = []
    jobs = restore_jobs(cache, model, record, keep, positions, total_len, before=before, defer_from=defer,
                        sizers=sizers, pace=pace)
    if jobs is None:
        return False
    t1 = time.perf_counter()
    if layerwise:
        from .pipeline.loader import LayerLoader

        # weakly: a cache nobody runs or holds any more (a request cancelled before generate()) is freed at once,
        # with what its restore holds (a disk record's open file) — a cycle would keep them until a gc pass
        owner = weakref.ref(cache)
        for i, layer in enumerate(cache.layers):
            layer._waiter = lambda i=i: (c := owner()) is not None and c._wait_layer(i)

        def size_held_back():
            for size in sizers:
                size()
            return _buffers(cache, defer)

        # reading from disk happens on the loader's thread on CUDA too (it then enqueues on the side stream)
        cache._loader = LayerLoader(jobs, _device_dtype(model)[0], keepalive=record,
                                    threaded=True if before is not None or threaded else None,
                                    ahead=ahead, before_release=size_held_back if sizers else None)
        cache._loader.start(_buffers(cache))
    else:
        for job in jobs:
            if job is not None:
                job()
    cache.host_ms.update(restore_setup=(t1 - t0) * 1e3, restore_issue=(time.perf_counter() - t1) * 1e3)
    if layerwise and cache._loader.run_seconds is not None:
        cache.host_ms["restore_jobs"] = cache._loader.run_seconds * 1e3
    return True
