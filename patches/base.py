"""The adapter interface: where a model family's pre-RoPE keys and RoPE tables come from."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """What attnstore-hf needs to know about one model family.

    Attributes:
        name: human-readable family name.
        model_types: ``config.model_type`` values this adapter serves.
        key_module: attribute of the attention module whose *output* is the key right before RoPE
            (``"k_proj"`` for Llama-like models, ``"k_norm"`` where a norm follows the projection).
        key_layout: the layout of that output: ``"flat"`` = ``[B, T, H*D]``, ``"bthd"`` = ``[B, T, H, D]``,
            ``"bhtd"`` = ``[B, H, T, D]``.
    """

    name: str
    model_types: tuple[str, ...]
    key_module: str
    key_layout: str

    # ---- structure -------------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack (the module owning ``layers`` and ``rotary_emb``)."""
        inner = getattr(model, "model", model)
        if hasattr(inner, "language_model") and not hasattr(inner, "layers"):
            inner = inner.language_model
        return inner

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.decoder(model).layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def capture_module(self, layer: nn.Module) -> nn.Module:
        return getattr(self.attention(layer), self.key_module)

    def head_dim(self, layer: nn.Module) -> int:
        return self.attention(layer).head_dim

    # ---- keys ------------------------------------------------------------------------------------------
    def to_bhtd(self, out: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Bring the capture module's output to the cache layout ``[B, H, T, D]`` (a view, no copy)."""
        if self.key_layout == "flat":
            b, t, _ = out.shape
            return out.view(b, t, -1, head_dim).transpose(1, 2)
        if self.key_layout == "bthd":
            return out.transpose(1, 2)
        if self.key_layout == "bhtd":
            return out
        raise ValueError(f"unknown key layout {self.key_layout!r}")

    # ---- RoPE ------------------------------------------------------------------------------------------
    def layer_type(self, model: nn.Module, layer_idx: int) -> str | None:
        types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
        return types[layer_idx] if types else None

    def rope_tables(
        self, model: nn.Module, layer_idx: int, position_ids: torch.Tensor, dtype: torch.dtype, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``position_ids`` ([B, T]) exactly as the model computes them for this layer."""
        rotary = self.decoder(model).rotary_emb
        x = torch.empty(0, dtype=dtype, device=device)
        params = inspect.signature(rotary.forward).parameters
        if "layer_type" in params:
            return rotary(x, position_ids.to(device), self.layer_type(model, layer_idx))
        return rotary(x, position_ids.to(device))
