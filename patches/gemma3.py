"""Gemma 3 (text): pre-RoPE keys are the output of ``k_norm`` ([B, H, T, D]); RoPE theta per layer type."""

from .base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="Gemma 3", model_types=("gemma3_text", "gemma3"), key_module="k_norm", key_layout="bhtd"
)
