"""Record codecs: how a layer's pre-RoPE K/V are stored (``none``, ``bf16``, ``fp16``, ``int8``, ``fp8``)."""

from __future__ import annotations

import torch

from .errors import ConfigError

CODECS = ("none", "bf16", "fp16", "int8", "fp8")
#: tokens per block of the quantized codecs' per-channel key scales. Blocks are aligned to the tokens' positions
#: in the conversation (a sliding layer's window starts anywhere), and a block's scales are its own: a
#: conversation's next record re-encodes its earlier (already quantized) full blocks to exactly the same codes,
#: where one scale over all tokens changed whenever a turn brought a larger key and rounded every earlier key
#: again (the error grew turn by turn). Records of before 2026-11-27 (eighth session) have one block of any
#: length: still read.
KEY_BLOCK = 64
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0


def check_codec(name: str) -> str:
    if name not in CODECS:
        raise ConfigError(f"codec must be one of {CODECS}, got {name!r}")
    if name == "fp8" and _FP8 is None:
        raise ConfigError("codec 'fp8' needs a torch with float8_e4m3fn")
    return name


def encode(keys: torch.Tensor, values: torch.Tensor, codec: str, start: int = 0) -> dict[str, torch.Tensor]:
    """Encode ``[B, H, T, D]`` keys/values, the first at position ``start``. Keys are scaled per channel (pre-RoPE
    keys have outlier channels) in blocks of :data:`KEY_BLOCK` positions, values per token. Returns the tensors
    to store: ``k``, ``v`` and, for quantized codecs, ``ks`` (``[B, H, blocks, D]``), ``vs`` (``[B, H, T, 1]``)."""
    if codec == "none":
        return {"k": keys, "v": values}
    if codec in ("bf16", "fp16"):
        dt = torch.bfloat16 if codec == "bf16" else torch.float16
        return {"k": keys.to(dt), "v": values.to(dt)}
    kf = keys.to(torch.float32, copy=True)  # (scaled in place below)
    vf = values.float()
    top = 127.0 if codec == "int8" else _FP8_MAX
    n, first = kf.shape[-2], start % KEY_BLOCK
    runs = _block_runs(first, n)
    if runs:
        amax = torch.cat([_blocked(kf, lo, hi, nb).abs().amax(dim=3) for lo, hi, _, nb in runs], dim=2)
    else:
        amax = kf.new_zeros((*kf.shape[:2], 1, kf.shape[3]))
    ks = (amax / top).clamp_min(1e-12)  # [B, H, blocks, D]: per channel, per block of KEY_BLOCK positions
    vs = (vf.abs().amax(dim=-1, keepdim=True) / top).clamp_min(1e-12)  # [B, H, T, 1]: per token
    _scale_keys_(kf, ks, first, 0, divide=True)
    if codec == "int8":
        k = torch.round(kf).clamp_(-127, 127).to(torch.int8)
        v = torch.round(vf / vs).clamp_(-127, 127).to(torch.int8)
    else:
        k = kf.clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
        v = (vf / vs).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
    # the scales stay float32: in float16 a token whose values are all below ~0.008 (int8; ~0.03 fp8) lost
    # precision in its scale (fp8 scales under 6e-8 became 0), records before 2026-11-27 (sixth session) have them
    return {"k": k, "v": v, "ks": ks, "vs": vs}


def key_scale_blocks(n_tokens: int, start: int = 0) -> int:
    """How many blocks of key scales a quantized layer of ``n_tokens`` tokens from position ``start`` has."""
    return max(1, -(-(start % KEY_BLOCK + n_tokens) // KEY_BLOCK))


def _block_runs(first: int, n: int) -> list[tuple[int, int, int, int]]:
    """Tokens ``0 .. n-1``, the first at offset ``first`` in its block, as runs ``(lo, hi, block, blocks)``: the
    part of a block before the first block boundary, the whole blocks, and the part of a block after the last
    (``block``: the index of the run's first block, counted from the first token's block)."""
    runs, i, b = [], 0, 0
    if first and n:
        i = min(n, KEY_BLOCK - first)
        runs.append((0, i, 0, 1))
        b = 1
    whole = (n - i) // KEY_BLOCK
    if whole:
        runs.append((i, i + whole * KEY_BLOCK, b, whole))
        i, b = i + whole * KEY_BLOCK, b + whole
    if i < n:
        runs.append((i, n, b, 1))
    return runs


def _blocked(x: torch.Tensor, lo: int, hi: int, blocks: int) -> torch.Tensor:
    """Tokens ``lo .. hi-1`` of ``[B, H, T, D]`` as a ``[B, H, blocks, tokens per block, D]`` view."""
    return x[:, :, lo:hi].unflatten(2, (blocks, (hi - lo) // blocks))


def _scale_keys_(x: torch.Tensor, ks: torch.Tensor, first: int, block0: int, divide: bool = False) -> None:
    """Multiply (or divide) the float32 keys ``x`` in place by their blocks' scales: ``x``'s first token is at
    offset ``first`` in block ``block0`` of ``ks``. One operation per run of whole blocks (no per-token copy of
    the scales)."""
    if ks.shape[-2] == 1:  # one block (records written before the blocks, or short ones)
        x.div_(ks) if divide else x.mul_(ks)
        return
    for lo, hi, b, nb in _block_runs(first, x.shape[-2]):
        view, scale = _blocked(x, lo, hi, nb), ks[:, :, block0 + b:block0 + b + nb].unsqueeze(3)
        view.div_(scale) if divide else view.mul_(scale)


def decode(parts: dict[str, torch.Tensor], codec: str, dtype: torch.dtype, token_index=None,
           device=None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values in ``dtype`` on ``device`` for the tokens ``token_index`` (a slice or index tensor on the
    token axis; ``None`` = all) of a layer whose first token is at position ``start`` (what it was encoded
    with). The narrow data moves to the device first and is widened there."""
    sel = slice(None) if token_index is None else token_index

    def move(t):
        """The selected tokens of ``t`` on ``device``. A strided slice of page-locked memory would be gathered
        into pageable memory and copied synchronously: copy the whole tensor asynchronously, then slice."""
        if device is None or torch.device(device).type != "cuda":
            part = t[:, :, sel]
            return part if device is None else part.to(device, non_blocking=True)
        part = t[:, :, sel] if isinstance(sel, slice) else None
        if part is not None and part.is_contiguous():
            return part.to(device, non_blocking=True)
        whole = t.to(device, non_blocking=True)
        return whole[:, :, sel.pin_memory().to(device, non_blocking=True) if isinstance(sel, torch.Tensor) else sel]

    k, v = move(parts["k"]), move(parts["v"])
    if codec in ("none", "bf16", "fp16"):
        return k.to(dtype), v.to(dtype)
    ks = parts["ks"].to(k.device, non_blocking=True)
    kf, first = k.float(), start % KEY_BLOCK  # (a new tensor: scaled in place)
    if ks.shape[-2] == 1 or isinstance(sel, slice):  # a run of tokens: their blocks' scales, run by run
        g = first + ((sel.start or 0) if isinstance(sel, slice) else 0)
        _scale_keys_(kf, ks, g % KEY_BLOCK, g // KEY_BLOCK)
    else:  # tokens picked one by one: each one's block
        idx = sel
        if idx.device != ks.device:
            idx = idx.pin_memory().to(ks.device, non_blocking=True) if ks.device.type == "cuda" else idx.to(ks.device)
        kf.mul_(ks.index_select(2, (idx + first) // KEY_BLOCK))
    vs = move(parts["vs"])
    return kf.to(dtype), (v.float() * vs.float()).to(dtype)

