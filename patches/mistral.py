"""Mistral: pre-RoPE keys are the output of ``k_proj``; optional sliding window."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(name="Mistral", model_types=("mistral",), key_module="k_proj", key_layout="flat")
