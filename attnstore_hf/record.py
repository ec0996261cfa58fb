"""SessionRecord: a conversation's token ids, per-layer pre-RoPE K/V and metadata; its safetensors encoding."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import weakref
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load

from .codec import key_scale_blocks
from .errors import RecordError

#: 2: tensor checksums are xxh3-128 (named in the header's ``checksum`` field); 1: sha256, still read
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: tensor checksum of new records. They detect corruption (a flipped bit, a torn or truncated write), not forgery:
#: whoever can write a record file can also rewrite its checksums, whatever the hash. xxh3-128 runs at memory
#: speed (~20x sha256 on this CPU), which matters because every record is hashed on every write and read.
CHECKSUM = "xxh3_128"
MAGIC = "attnstore-hf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
# dtype of stored k/v per codec (None: the record's dtype)
_CODEC_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
                 "fp8": getattr(torch, "float8_e4m3fn", None)}


def session_key(namespace: str, session_id: str) -> str:
    """Storage key of a session: a hash, so hostile ids (``../../etc``, NUL bytes, 10 kB) are harmless."""
    return hashlib.sha256(f"{namespace}\x00{session_id}".encode("utf-8", "surrogatepass")).hexdigest()


def _header_digest(head: dict) -> str:
    """sha256 of the header's content (token ids, namespace, fingerprint, tensor checksums...)."""
    body = {k: v for k, v in head.items() if k != "header_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest_bytes(buf, algo: str | None = None) -> str:
    algo = algo or CHECKSUM
    if algo == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128_hexdigest(buf)
    if algo == "sha256":
        return hashlib.sha256(buf).hexdigest()
    raise RecordError(f"unknown checksum {algo!r}")


def _digest(t: torch.Tensor, algo: str | None = None) -> str:
    return _digest_bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy(), algo)


def _checksum_algo(head: dict) -> str:
    return head.get("checksum", "sha256") if head.get("format_version") == 2 else "sha256"


def _header_len(first8: bytes, size: int) -> int:
    """Length of the safetensors JSON header, from a record file's first 8 bytes (checked against its size)."""
    if len(first8) < 8:
        raise RecordError(f"record is truncated ({size} bytes)")
    (hlen,) = struct.unpack("<Q", first8)
    if hlen > size - 8:
        raise RecordError("record is truncated: header runs past the end of the file")
    return hlen


def _parse_header(raw: bytes, expect_namespace: str | None, expect_session: str | None) -> tuple[dict, dict]:
    """(tensor specs, verified attnstore header) from a record file's safetensors JSON header."""
    specs = json.loads(raw)
    meta = specs.pop("__metadata__", None) or {}
    head = json.loads(meta["attnstore"])
    _check_head(head, expect_namespace, expect_session)
    return specs, head


def _check_head(head: dict, expect_namespace: str | None, expect_session: str | None) -> None:
    """The checks of a record's JSON header (its tensors are checked against ``head["checksums"]`` separately)."""
    if head.get("magic") != MAGIC:
        raise RecordError("not an attnstore-hf record")
    if head.get("format_version") not in READABLE_VERSIONS:
        raise RecordError(f"record format version {head.get('format_version')} is not one of {READABLE_VERSIONS}")
    if _checksum_algo(head) not in ("xxh3_128", "sha256"):
        raise RecordError(f"unknown checksum {head.get('checksum')!r}")
    if expect_namespace is not None and head["namespace"] != expect_namespace:
        raise RecordError("record belongs to another namespace")
    if expect_session is not None and head["session_id"] != expect_session:
        raise RecordError("record belongs to another session")
    if head.get("header_checksum") != _header_digest(head):
        raise RecordError("header checksum mismatch: token ids or metadata are corrupt")
    if head["dtype"] not in _DTYPES:
        raise RecordError(f"unknown dtype {head['dtype']!r}")


@dataclass
class LayerKV:
    """One layer of a record: pre-RoPE keys and values ``[1, H, n, D]`` of positions ``start .. start+n-1``,
    as the record's codec stores them (with per-channel key scales / per-token value scales if quantized)."""

    kind: str  # "full" or "sliding"
    start: int
    keys: torch.Tensor
    values: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def parts(self) -> dict[str, torch.Tensor]:
        p = {"k": self.keys, "v": self.values}
        if self.k_scale is not None:
            p["ks"], p["vs"] = self.k_scale, self.v_scale
        return p

    @property
    def nbytes(self) -> int:
        k, v = self.keys, self.values
        n = k.numel() * k.element_size() + v.numel() * v.element_size()
        if self.k_scale is not None:
            n += self.k_scale.numel() * self.k_scale.element_size() + self.v_scale.numel() * self.v_scale.element_size()
        return n


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
    codec: str = "none"

    @property
    def key(self) -> str:
        return session_key(self.namespace, self.session_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return sum(lay.nbytes for lay in self.layers) + 8 * len(self.token_ids)

    def check_layout(self) -> None:
        """:class:`RecordError` unless the tensors fit the record: the codec's dtypes, ``[1, H, n, D]`` keys and
        values of equal shape, each layer's positions ``start .. start+n-1`` the record's last tokens (what a record
        read back is checked against: a store must not hold, in DRAM, what it would reject from disk)."""
        if self.codec not in _CODEC_DTYPES:
            raise RecordError(f"unknown codec {self.codec!r}")
        if self.dtype not in _DTYPES:
            raise RecordError(f"unknown dtype {self.dtype!r}")
        want = _CODEC_DTYPES[self.codec] or _DTYPES[self.dtype]
        for i, lay in enumerate(self.layers):
            k, v = lay.keys, lay.values
            if k.dtype != want or v.dtype != want or k.dim() != 4 or tuple(k.shape) != tuple(v.shape):
                raise RecordError(f"layer {i} does not match the record's codec and dtype, or its keys and values "
                                  "differ in shape")
            n = lay.length
            if lay.start < 0 or (n and lay.start + n != self.num_tokens) or n > self.num_tokens:
                raise RecordError(f"layer {i}: positions {lay.start}..{lay.start + n - 1} are not the last of the "
                                  f"record's {self.num_tokens} tokens")

    # ---- encoding ---------------------------------------------------------------------------------------
    def header(self) -> dict:
        return {
            "magic": MAGIC,
            "format_version": FORMAT_VERSION,
            "checksum": CHECKSUM,
            "namespace": self.namespace,
            "session_id": self.session_id,
            "fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "codec": self.codec,
            "token_ids": self.token_ids,
            "layers": [{"kind": lay.kind, "start": lay.start, "length": lay.length} for lay in self.layers],
            "meta": self.meta,
        }

    def encode_chunks(self) -> tuple[list, int]:
        """The record file (safetensors) as a list of buffers — length prefix, JSON header, then each tensor's
        own memory, nothing copied — and its size in bytes. A writer streams them to the file."""
        tensors = {}
        for i, lay in enumerate(self.layers):
            for name, t in lay.parts().items():
                tensors[f"{name}.{i}"] = t.detach().contiguous()
        head = self.header()
        head["checksums"] = {name: _digest(t) for name, t in tensors.items()}
        head["header_checksum"] = _header_digest(head)
        spec, bufs, offset = {}, [], 0
        for name, t in tensors.items():
            buf = t.reshape(-1).view(torch.uint8).numpy()
            spec[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + buf.size]}
            offset += buf.size
            bufs.append(buf)
        spec["__metadata__"] = {"attnstore": json.dumps(head)}
        hdr = json.dumps(spec, separators=(",", ":")).encode()
        hdr += b" " * (-len(hdr) % 8)  # tensor data 8-byte aligned, as safetensors writes it
        return [struct.pack("<Q", len(hdr)), hdr, *bufs], 8 + len(hdr) + offset

    def to_bytes(self) -> bytes:
        return b"".join(self.encode_chunks()[0])

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_namespace: str | None = None,
                   expect_session: str | None = None) -> "SessionRecord":
        """Decode and verify a record. Any defect raises :class:`RecordError` (the store turns it into a miss)."""
        try:
            hlen = _header_len(data[:8], len(data))
            _, head = _parse_header(data[8 : 8 + hlen], expect_namespace, expect_session)
            tensors = st_load(data)
            sums = head["checksums"]
            if set(sums) != set(tensors):
                raise RecordError("record tensors do not match its header")
            algo = _checksum_algo(head)
            for name, t in tensors.items():
                if _digest(t, algo) != sums[name]:
                    raise RecordError(f"checksum mismatch in tensor {name}: the file is corrupt")
            return cls._from_parts(head, tensors)
        except RecordError:
            raise
        except Exception as exc:  # safetensors/json/struct errors on corrupt input
            raise RecordError(f"corrupt record: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def _from_parts(cls, head: dict, tensors: dict[str, torch.Tensor]) -> "SessionRecord":
        """A record from a verified header and its tensors (checked against the header's layout)."""
        codec = head.get("codec", "none")
        if codec not in _CODEC_DTYPES:
            raise RecordError(f"unknown codec {codec!r}")
        want = _CODEC_DTYPES[codec] or _DTYPES[head["dtype"]]
        layers = []
        for i, spec in enumerate(head["layers"]):
            k, v = tensors.get(f"k.{i}"), tensors.get(f"v.{i}")
            n = spec["length"]
            if k is None or v is None or k.dtype != want or v.dtype != want or k.dim() != 4 \
                    or k.shape[-2] != n or v.shape[-2] != n:
                raise RecordError(f"layer {i} does not match the header")
            ks, vs = tensors.get(f"ks.{i}"), tensors.get(f"vs.{i}")
            if codec in ("int8", "fp8"):
                if ks is None or vs is None or tuple(vs.shape) != (*v.shape[:3], 1) or ks.dim() != 4 \
                        or tuple(ks.shape) not in {(*k.shape[:2], b, k.shape[3])
                                                   for b in (1, key_scale_blocks(n, int(spec["start"])))}:
                    raise RecordError(f"layer {i}: missing or misshapen quantization scales")
            layers.append(LayerKV(spec["kind"], int(spec["start"]), k, v, ks, vs))
        token_ids = [int(t) for t in head["token_ids"]]
        rec = cls(head["namespace"], head["session_id"], head["fingerprint"], head["dtype"], token_ids,
                  layers, head.get("meta") or {}, codec)
        rec.check_layout()
        return rec


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I8": torch.int8,
              "F8_E4M3": getattr(torch, "float8_e4m3fn", None)}
_ST_NAMES = {dt: name for name, dt in _ST_DTYPES.items() if dt is not None}


class LazyRecord:
    """A record file opened for a layer-wise restore: the header is read and verified now; each layer's tensors
    are read and checked against their checksums only when :meth:`materialize` asks for them (on the loader thread,
    while earlier layers compute). Until then ``record``'s tensors are shape-only (``meta`` device) placeholders,
    so sizes, shapes and dtypes can be checked without reading the data. The file stays open, so a concurrent
    replacement or eviction of the file does not change what is read.
    """

    def __init__(self, path, *, expect_namespace: str | None = None, expect_session: str | None = None):
        self._f = open(path, "rb")
        try:
            self._open(expect_namespace, expect_session)
        except RecordError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise RecordError(f"corrupt record: {type(exc).__name__}: {exc}") from exc

    def _open(self, expect_namespace, expect_session) -> None:
        size = os.fstat(self._f.fileno()).st_size
        hlen = _header_len(self._f.read(8), size)
        raw, head = _parse_header(self._f.read(hlen), expect_namespace, expect_session)
        self._base = 8 + hlen
        self.bytes_read = self._base  # header now, each layer's tensors as they are read
        self._specs = {}
        for name, spec in raw.items():
            dt = _ST_DTYPES.get(spec["dtype"])
            begin, end = (int(x) for x in spec["data_offsets"])
            shape = tuple(int(x) for x in spec["shape"])
            if dt is None or end < begin or self._base + end > size:
                raise RecordError(f"tensor {name} is truncated or of an unknown dtype")
            if math.prod(shape) * dt.itemsize != end - begin:
                raise RecordError(f"tensor {name} does not match its shape")
            self._specs[name] = (dt, shape, begin, end)
        self.sums = head["checksums"]
        self.algo = _checksum_algo(head)
        if set(self.sums) != set(self._specs):
            raise RecordError("record tensors do not match its header")
        meta_tensors = {name: torch.empty(shape, dtype=dt, device="meta")
                        for name, (dt, shape, _, _) in self._specs.items()}
        self._record = SessionRecord._from_parts(head, meta_tensors)

    @property
    def record(self) -> SessionRecord:
        rec = self._record
        return rec() if isinstance(rec, weakref.ref) else rec

    def attach(self) -> SessionRecord:
        """Hand the record out with this reader attached (``record._lazy``), holding it only weakly from here: no
        reference cycle, so once nobody holds the record (a restore that was never run) the file is closed at
        once, not at the next garbage collection."""
        rec = self._record
        rec._lazy = self
        self._record = weakref.ref(rec)
        return rec

    def materialize(self, i: int, pin: bool = False) -> None:
        """Read and verify layer ``i``'s tensors (raises :class:`RecordError` on a mismatch)."""
        lay = self.record.layers[i]
        out = {}
        for short in ("k", "v", "ks", "vs"):
            name = f"{short}.{i}"
            if name not in self._specs:
                continue
            dt, shape, begin, end = self._specs[name]
            t = torch.empty(shape, dtype=dt, pin_memory=pin)
            buf = t.reshape(-1).view(torch.uint8).numpy()
            got = os.preadv(self._f.fileno(), [buf], self._base + begin) if buf.size else 0
            if got != buf.size:
                raise RecordError(f"tensor {name} is truncated")
            if _digest_bytes(buf, self.algo) != self.sums[name]:
                raise RecordError(f"checksum mismatch in tensor {name}: the file is corrupt")
            self.bytes_read += got
            out[short] = t
        lay.keys, lay.values = out["k"], out["v"]
        lay.k_scale, lay.v_scale = out.get("ks"), out.get("vs")

    def materialize_all(self, pin: bool = False) -> SessionRecord:
        """Read and verify every layer now; the record, whole."""
        for i in range(len(self.record.layers)):
            self.materialize(i, pin)
        return self.record

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass

    def __del__(self) -> None:
        if getattr(self, "_f", None) is not None:
            self.close()


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise RecordError(f"unsupported KV dtype {dtype}")


def transcode(record: SessionRecord, codec: str) -> SessionRecord:
    """The same record stored with another codec (decoded to the record's dtype, then encoded)."""
    from .codec import decode, encode

    if codec == record.codec:
        return record
    dtype = _DTYPES[record.dtype]
    layers = []
    for lay in record.layers:
        k, v = decode(lay.parts(), record.codec, dtype, start=lay.start)
        p = encode(k, v, codec, lay.start)
        layers.append(LayerKV(lay.kind, lay.start, p["k"], p["v"], p.get("ks"), p.get("vs")))
    return SessionRecord(record.namespace, record.session_id, record.fingerprint, record.dtype,
                         list(record.token_ids), layers, dict(record.meta), codec)
