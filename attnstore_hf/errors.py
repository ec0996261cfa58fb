"""Every exception attnstore-hf raises, with messages that say what to do."""


class AttnStoreError(Exception):
    """Base class of all attnstore-hf errors."""


class UnsupportedModelError(AttnStoreError):
    """The model has no RoPE, or no adapter in `attnstore_hf.patches` knows where its pre-RoPE keys come from."""


class ConfigError(AttnStoreError, ValueError):
    """A `StoreConfig` field has a value that cannot work."""


class RecordError(AttnStoreError):
    """A stored record is corrupt, truncated, of another format version, or written by another model/dtype.

    The store turns it into a cache miss (recompute) with a warning; it never reaches `generate()`.
    """


class NotPatchedError(AttnStoreError, RuntimeError):
    """The cache was updated without the pre-RoPE capture hooks that `patch_model` installs."""
