"""patch_model / unpatch_model: the forward hooks that capture pre-RoPE keys, and the model fingerprint."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import torch
from torch import nn

from .patches import FamilyAdapter, get_adapter

_ATTR = "_attnstore_patch"
#: bumped whenever any module registers or replaces a parameter (``load_state_dict(assign=True)``, ``module.weight
#: = nn.Parameter(...)``): a patch then re-reads its model's parameter list
_PARAM_EPOCH = [0]


def _on_parameter_registered(module, name, param):
    _PARAM_EPOCH[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_on_parameter_registered)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype",
                         "_attn_implementation", "_attn_implementation_autoset", "use_cache"}


class ModelPatch:
    """The state ``patch_model`` attaches to a model: capture hooks, the key stash, the fingerprint."""

    def __init__(self, model: nn.Module, adapter: FamilyAdapter):
        self.adapter = adapter
        self.handles: list = []
        self._local = threading.local()
        self._fingerprint: str | None = None
        self._weights_seen = None  # the weights' stamp when the fingerprint was taken (see _weights_stamp)
        self._params: list = []
        self._params_epoch = -1
        self.kv_shapes: list[tuple[int, int]] = []  # (kv heads, head_dim) per layer
        layers = adapter.layers(model)
        for layer in layers:
            attn = adapter.attention(layer)
            layer_idx = getattr(attn, "layer_idx", None)
            if layer_idx is None:
                layer_idx = layers.index(layer)
            head_dim = adapter.head_dim(layer)
            hook = adapter.capture_module(layer).register_forward_hook(self._make_hook(layer_idx, head_dim))
            self.handles.append(hook)
            self.kv_shapes.append((attn.k_proj.out_features // head_dim, head_dim))
        self.num_layers = len(layers)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size: int | None = getattr(emb, "num_embeddings", None)  # token ids must be below it
        decoder = adapter.decoder(model)
        self.handles.append(decoder.register_forward_pre_hook(self._forward_start, with_kwargs=True))
        self.handles.append(decoder.register_forward_hook(self._forward_end, with_kwargs=True))
        self.on_prefill = None  # callable(tokens, seconds) fed with every timed prefill forward
        self._timing = threading.local()
        self._cuda_timings: list = []  # (tokens, start event, end event) not read yet
        self.layer_kinds: list | None = None  # per layer: sliding window or None (worked out by the cache, once)
        self.layer_types = [adapter.layer_type(model, i) for i in range(self.num_layers)]
        self._rope: dict = {}  # (layer type, device, dtype) -> (cos, sin, inv_freq they were made from)
        self._rope_lock = threading.Lock()

    # ---- RoPE tables, kept across turns ----------------------------------------------------------------------
    #: rope types whose frequencies do not depend on the sequence length: a table for positions [0, n) is a
    #: prefix of the table for [0, m), so one table serves every turn ("dynamic" and "longrope" are recomputed)
    STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})

    def _rope_types(self, model: nn.Module) -> set:
        types = getattr(self.adapter.decoder(model).rotary_emb, "rope_type", None)
        return set(types.values()) if isinstance(types, dict) else {types}

    def static_rope(self, model: nn.Module) -> bool:
        """Whether the rotary frequencies are the same at every length (no :meth:`rope_regime` to tell apart)."""
        return self._rope_types(model) <= self.STATIC_ROPE

    def rope_regime(self, model: nn.Module, length: int) -> str | None:
        """Which rotary frequencies a forward over ``length`` tokens uses, for rope types whose frequencies depend on
        the length (``longrope``: short or long factors past ``original_max_position_embeddings``; ``dynamic``:
        rescaled for every length past ``max_position_embeddings``); ``None`` for the static types. K/V computed
        under one regime are not what a forward under another computes — re-rotating the stored keys fixes the
        first layer only, the deeper ones carry the old frequencies in their hidden states — so a record is reused
        only under its own regime."""
        rotary = self.adapter.decoder(model).rotary_emb
        types = self._rope_types(model)
        if types <= self.STATIC_ROPE:
            return None
        config = getattr(model.config, "get_text_config", lambda: model.config)()
        params = getattr(config, "rope_parameters", None) or {}
        nested = [p for p in params.values() if isinstance(p, dict)]
        out = []
        for t in sorted(map(str, types)):
            if t == "longrope":
                limit = next((p.get("original_max_position_embeddings") for p in [params, *nested]
                              if p.get("original_max_position_embeddings")), None)
                limit = limit or getattr(config, "original_max_position_embeddings", None) \
                    or config.max_position_embeddings
                out.append(f"longrope:{'long' if length > limit else 'short'}")
            elif t == "dynamic":
                limit = getattr(rotary, "original_max_seq_len", None) or config.max_position_embeddings
                out.append(f"dynamic:{'short' if length <= limit else length}")
            else:  # a type not known here: its frequencies may depend on the length in any way
                out.append(f"{t}:{length}")
        return ",".join(out)

    def rope_tables(self, model: nn.Module, layer_idx: int, span: int, dtype: torch.dtype, device):
        """cos/sin ``[1, >= span, D]`` for positions ``0 .. span-1`` as the model computes them for this layer.

        For static rope types the table is kept and grown (doubling), so a turn does not recompute it; it is
        recomputed if the rotary module's frequencies were replaced. Other types get a fresh table for exactly
        ``span`` positions each time."""
        ltype = self.layer_types[layer_idx] if layer_idx < len(self.layer_types) else None
        rotary = self.adapter.decoder(model).rotary_emb
        rope_type = getattr(rotary, "rope_type", None)
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(ltype)
        inv_freq = getattr(rotary, f"{ltype}_inv_freq" if ltype and hasattr(rotary, f"{ltype}_inv_freq")
                           else "inv_freq", None)

        def compute(n):
            positions = torch.arange(n, device=device).unsqueeze(0)
            return self.adapter.rope_tables(model, layer_idx, positions, dtype, device)

        if rope_type not in self.STATIC_ROPE or inv_freq is None:
            return compute(span)
        key = (ltype, str(torch.device(device)), dtype)
        with self._rope_lock:
            held = self._rope.get(key)
            if held is not None and held[0].shape[1] >= span and held[2] is inv_freq \
                    and held[3] == inv_freq._version:
                return held[0], held[1]
            n = max(span, 256, 2 * held[0].shape[1] if held is not None and held[2] is inv_freq else 0)
            cos, sin = compute(n)
            self._rope[key] = (cos, sin, inv_freq, inv_freq._version)
            return cos, sin

    # ---- prefill timing (feeds the store's cost model) ----------------------------------------------------------
    #: forwards with fewer new tokens than this (decode steps) are not timed
    MIN_TIMED_TOKENS = 16

    @staticmethod
    def _tokens(args, kwargs) -> int:
        x = ModelPatch._ids(args, kwargs)
        if x is None:
            x = kwargs.get("inputs_embeds")
        return int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0

    @staticmethod
    def _ids(args, kwargs) -> torch.Tensor | None:
        x = kwargs.get("input_ids")
        if x is None and args and kwargs.get("inputs_embeds") is None:
            x = args[0]
        return x if isinstance(x, torch.Tensor) and x.dim() == 2 else None

    @property
    def capturing(self) -> bool:
        """Whether this thread's forward keeps pre-RoPE keys (only for an AttentionStoreCache, which takes them)."""
        return getattr(self._local, "capturing", False)

    @capturing.setter
    def capturing(self, value: bool) -> None:
        self._local.capturing = value

    def _forward_start(self, module, args, kwargs):
        n = self._tokens(args, kwargs)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        on_forward = getattr(cache, "_on_forward", None)
        self.capturing = on_forward is not None
        if on_forward is not None:
            on_forward(self._ids(args, kwargs), kwargs)
        if n < self.MIN_TIMED_TOKENS or self.on_prefill is None or getattr(cache, "_loader", None) is not None:
            # decode steps, and forwards that may wait for a restore, say nothing about the prefill speed
            self._timing.start = None
            return
        if torch.cuda.is_available() and next(module.parameters()).is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._timing.start = (n, ev)
        else:
            self._timing.start = (n, time.perf_counter())

    def _forward_end(self, module, args, kwargs, output):
        self.stash.clear()  # keys no cache layer took (a layer the cache skipped): not kept past the forward
        self.capturing = False  # a layer called on its own afterwards keeps nothing
        start = getattr(self._timing, "start", None)
        self._timing.start = None
        if start is None or self.on_prefill is None:
            return
        n, t0 = start
        if isinstance(t0, float):
            self.on_prefill(n, time.perf_counter() - t0)
        else:  # CUDA: read the events later, never synchronising here
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._cuda_timings.append((n, t0, ev))
        self.read_timings()

    def read_timings(self) -> None:
        """Report the CUDA prefill timings whose events have completed (no waiting)."""
        keep = []
        for n, a, b in self._cuda_timings:
            if b.query():
                if self.on_prefill is not None:
                    self.on_prefill(n, a.elapsed_time(b) / 1e3)
            else:
                keep.append((n, a, b))
        self._cuda_timings = keep[-16:]

    def _make_hook(self, layer_idx: int, head_dim: int):
        adapter = self.adapter

        def hook(module, args, output):
            if self.capturing:
                self.stash[layer_idx] = adapter.to_bhtd(output, head_dim)

        return hook

    @property
    def stash(self) -> dict[int, torch.Tensor]:
        s = getattr(self._local, "stash", None)
        if s is None:
            s = self._local.stash = {}
        return s

    def take(self, layer_idx: int) -> torch.Tensor | None:
        """The pre-RoPE keys layer ``layer_idx`` computed in this forward (consumed once)."""
        return self.stash.pop(layer_idx, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.stash.clear()

    def _weights_stamp(self, model: nn.Module) -> tuple:
        """Changes when the weights may have: an in-place update bumps a parameter's version (``load_state_dict``,
        an optimizer step), a replaced parameter the registration epoch, new data (``p.data = ...``, which casts
        and moves use, a cast there and back included) the storage addresses. ~45 us for 291 parameters on this
        CPU, against ~0.5 ms to walk the modules or seconds to hash the weights again."""
        if self._params_epoch != _PARAM_EPOCH[0]:
            self._params, self._params_epoch = list(model.parameters()), _PARAM_EPOCH[0]
        params = self._params
        return sum(p._version for p in params), hash(tuple(p.data_ptr() for p in params)), self._params_epoch

    def fingerprint(self, model: nn.Module) -> str:
        """:func:`model_fingerprint`, taken again when the weights changed since (records of the old weights are
        then another model's: a miss, never a wrong answer)."""
        stamp = self._weights_stamp(model)
        if self._fingerprint is None or stamp != self._weights_seen:
            self._fingerprint = model_fingerprint(model)
            self._weights_seen = stamp
        return self._fingerprint


def patch_model(model: nn.Module) -> ModelPatch:
    """Install the pre-RoPE key capture on ``model``. Idempotent: a second call returns the same patch.

    Raises :class:`~attnstore_hf.UnsupportedModelError` for a model without RoPE or without an adapter.
    """
    patch = getattr(model, _ATTR, None)
    if patch is not None and patch.handles:
        return patch
    patch = ModelPatch(model, get_adapter(model))
    object.__setattr__(model, _ATTR, patch)  # not a submodule/parameter: keep it out of state_dict
    return patch


def unpatch_model(model: nn.Module) -> bool:
    """Remove what :func:`patch_model` installed. Returns whether there was anything to remove."""
    patch = getattr(model, _ATTR, None)
    if patch is None:
        return False
    patch.remove()
    object.__delattr__(model, _ATTR)
    return True


def is_patched(model: nn.Module) -> bool:
    patch = getattr(model, _ATTR, None)
    return patch is not None and bool(patch.handles)


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """Identity of (architecture, config, weights, dtype): records of another model are never reused.

    Weights are summarised per tensor by name, shape, dtype, a strided sample of raw values, the sum and the L2 norm,
    computed where the weights live (no host copy of the whole model).
    """
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = model.config.to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(next(model.parameters()).dtype).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].float().cpu().numpy().tobytes()
        f = flat if flat.is_floating_point() else flat.double()
        sums = torch.stack([f.sum().double(), torch.linalg.vector_norm(f).double()]).cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample)
        h.update(sums)
    return h.hexdigest()
