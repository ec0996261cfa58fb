"""Qwen3: pre-RoPE keys are the output of ``k_norm``, applied per head before the transpose ([B, T, H, D])."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(name="Qwen3", model_types=("qwen3",), key_module="k_norm", key_layout="bthd")
