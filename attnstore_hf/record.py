"""SessionRecord: a conversation's token ids, per-layer pre-RoPE K/V and metadata; its safetensors encoding."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import RecordError

FORMAT_VERSION = 1
MAGIC = "attnstore-hf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def session_key(namespace: str, session_id: str) -> str:
    """Storage key of a session: a hash, so hostile ids (``../../etc``, NUL bytes, 10 kB) are harmless."""
    return hashlib.sha256(f"{namespace}\x00{session_id}".encode("utf-8", "surrogatepass")).hexdigest()


def _header_digest(head: dict) -> str:
    """sha256 of the header's content (token ids, namespace, fingerprint, tensor checksums...)."""
    body = {k: v for k, v in head.items() if k != "header_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class LayerKV:
    """One layer of a record: pre-RoPE keys and values ``[1, H, n, D]`` of positions ``start .. start+n-1``."""

    kind: str  # "full" or "sliding"
    start: int
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]


@dataclass
class SessionRecord:
    """Everything needed to restore a conversation's KV cache, and to check it may be restored."""

    namespace: str
    session_id: str
    fingerprint: str
    dtype: str
    token_ids: list[int]
    layers: list[LayerKV]
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return session_key(self.namespace, self.session_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(lay.keys.numel() * lay.keys.element_size() + lay.values.numel() * lay.values.element_size()
                   for lay in self.layers) + 8 * len(self.token_ids)

    # ---- encoding ---------------------------------------------------------------------------------------
    def header(self) -> dict:
        return {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "namespace": self.namespace,
            "session_id": self.session_id,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "token_ids": self.token_ids,
            "layers": [{"kind": lay.kind, "start": lay.start, "length": lay.length} for lay in self.layers],
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        tensors = {}
        for i, lay in enumerate(self.layers):
            tensors[f"k.{i}"] = lay.keys.contiguous()
            tensors[f"v.{i}"] = lay.values.contiguous()
        head = self.header()
        head["checksums"] = {name: _digest(t) for name, t in tensors.items()}
        head["header_checksum"] = _header_digest(head)
        return st_save(tensors, metadata={"attnstore": json.dumps(head)})

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_namespace: str | None = None,
                   expect_session: str | None = None) -> "SessionRecord":
        """Decode and verify a record. Any defect raises :class:`RecordError` (the store turns it into a miss)."""
        try:
            if len(data) < 8:
                raise RecordError(f"record is truncated ({len(data)} bytes)")
            (hlen,) = struct.unpack("<Q", data[:8])
            if hlen > len(data) - 8:
                raise RecordError("record is truncated: header runs past the end of the file")
            meta = json.loads(data[8 : 8 + hlen]).get("__metadata__") or {}
            head = json.loads(meta["attnstore"])
            if head.get("magic") != MAGIC:
                raise RecordError("not an attnstore-hf record")
            if head.get("format_version") != FORMAT_VERSION:
                raise RecordError(f"record format version {head.get('format_version')} is not {FORMAT_VERSION}")
            if expect_namespace is not None and head["namespace"] != expect_namespace:
                raise RecordError("record belongs to another namespace")
            if expect_session is not None and head["session_id"] != expect_session:
                raise RecordError("record belongs to another session")
            if head.get("header_checksum") != _header_digest(head):
                raise RecordError("header checksum mismatch: token ids or metadata are corrupt")
            if head["dtype"] not in _DTYPES:
                raise RecordError(f"unknown dtype {head['dtype']!r}")
            tensors = st_load(data)
            sums = head["checksums"]
            if set(sums) != set(tensors):
                raise RecordError("record tensors do not match its header")
            for name, t in tensors.items():
                if _digest(t) != sums[name]:
                    raise RecordError(f"checksum mismatch in tensor {name}: the file is corrupt")
            layers = []
            for i, spec in enumerate(head["layers"]):
                k, v = tensors[f"k.{i}"], tensors[f"v.{i}"]
                if k.dtype != _DTYPES[head["dtype"]] or k.shape[-2] != spec["length"] or v.shape[-2] != spec["length"]:
                    raise RecordError(f"layer {i} does not match the header")
                layers.append(LayerKV(spec["kind"], int(spec["start"]), k, v))
            token_ids = [int(t) for t in head["token_ids"]]
            for lay in layers:
                if lay.start + lay.length != len(token_ids) and lay.length:
                    raise RecordError("layer lengths do not match the token ids")
            return cls(head["namespace"], head["session_id"], head["fingerprint"], head["dtype"], token_ids,
                       layers, head.get("meta") or {})
        except RecordError:
            raise
        except Exception as exc:  # safetensors/json/struct errors on corrupt input
            raise RecordError(f"corrupt record: {type(exc).__name__}: {exc}") from exc


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise RecordError(f"unsupported KV dtype {dtype}")
