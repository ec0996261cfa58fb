"""attnstore-hf: keep every conversation's KV cache (keys before RoPE) and restore it exactly in generate()."""

from .cache import AttentionStoreCache
from .config import StoreConfig, parse_size
from .errors import AttnStoreError, ConfigError, NotPatchedError, RecordError, UnsupportedModelError
from .patching import is_patched, patch_model, unpatch_model
from .record import SessionRecord
from .store import AttentionStore

__version__ = "0.1.0"

__all__ = [
    "AttentionStore", "AttentionStoreCache", "AttnStoreError", "ConfigError", "NotPatchedError", "RecordError",
    "SessionRecord", "StoreConfig", "UnsupportedModelError", "is_patched", "parse_size", "patch_model",
    "unpatch_model",
]
