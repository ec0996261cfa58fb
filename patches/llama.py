"""Llama (and Llama-3 RoPE scaling): pre-RoPE keys are the output of ``k_proj``."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(name="Llama", model_types=("llama",), key_module="k_proj", key_layout="flat")
