"""Per-model-family adapters (shipped as ``attnstore_hf.patches``): where pre-RoPE keys and RoPE come from."""

from __future__ import annotations

from torch import nn

from attnstore_hf.errors import UnsupportedModelError

from .base import FamilyAdapter
from .gemma3 import ADAPTER as GEMMA3
from .llama import ADAPTER as LLAMA
from .mistral import ADAPTER as MISTRAL
from .qwen2 import ADAPTER as QWEN2
from .qwen3 import ADAPTER as QWEN3

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)


def supported_families() -> str:
    return ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ADAPTERS)


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming the supported families."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no `.config`; attnstore-hf needs a transformers model")
    text = config.get_text_config(decoder=True)
    model_type = getattr(text, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            _check_structure(model, adapter)
            return adapter
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported: attnstore-hf stores keys before RoPE "
        f"and needs a RoPE model with an adapter in attnstore_hf.patches. Supported families: {supported_families()}."
    )


def _check_structure(model: nn.Module, adapter: FamilyAdapter) -> None:
    try:
        layers = adapter.layers(model)
        adapter.decoder(model).rotary_emb
        for layer in layers:
            adapter.capture_module(layer)
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} looks like {adapter.name} but its modules are not where the adapter expects "
            f"them ({exc}); this transformers version may have changed the modeling code."
        ) from exc


__all__ = ["ADAPTERS", "FamilyAdapter", "get_adapter", "supported_families"]
