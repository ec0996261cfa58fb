"""Qwen2: pre-RoPE keys are the output of ``k_proj`` (with bias)."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(name="Qwen2", model_types=("qwen2",), key_module="k_proj", key_layout="flat")
