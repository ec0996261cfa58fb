"""RoPE at new positions for stored (pre-RoPE) keys, bit-identical to what the model computes itself."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation every supported family uses (same ops, same order as transformers)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys`` ``[B, H, T, D]`` with ``cos``/``sin`` ``[B, T, D]`` from the model's own rotary module.

    Written as transformers' ``apply_rotary_pos_emb`` writes it, ``(k * cos) + (rotate_half(k) * sin)``, so a
    stored key re-rotated here equals bit for bit the key the model produced at that position.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (keys * cos) + (rotate_half(keys) * sin)



def apply_rope_into(out: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` written into ``out`` (a view of the cache's buffer): the same operations in the same
    order, ``k * cos`` then ``+ rotate_half(k) * sin``, so the result is bit-identical, without a temporary the
    size of the keys and a copy of it."""
    torch.mul(keys, cos.unsqueeze(1), out=out)
    out.add_(rotate_half(keys) * sin.unsqueeze(1))
    return out
