"""The store and its tiers (DRAM, disk)."""

from .core import AttentionStore
from .disk import DiskTier
from .dram import DramTier

__all__ = ["AttentionStore", "DiskTier", "DramTier"]
