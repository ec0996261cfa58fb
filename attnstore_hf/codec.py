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
    kf, vf = keys.float(), values.float()
    top = 127.0 if codec == "int8" else _FP8_MAX
    n, first = kf.shape[-2], start % KEY_BLOCK
    blocks = key_scale_blocks(n, start)
    padded = torch.nn.functional.pad(kf.abs(), (0, 0, first, blocks * KEY_BLOCK - first - n))
    amax = padded.unflatten(-2, (blocks, KEY_BLOCK)).amax(dim=-2)
    ks = (amax / top).clamp_min(1e-12)  # [B, H, blocks, D]: per channel, per block of KEY_BLOCK positions
    vs = (vf.abs().amax(dim=-1, keepdim=True) / top).clamp_min(1e-12)  # [B, H, T, 1]: per token
    kst = per_token_scales(ks, n, start)
    if codec == "int8":
        k = torch.round(kf / kst).clamp_(-127, 127).to(torch.int8)
        v = torch.round(vf / vs).clamp_(-127, 127).to(torch.int8)
    else:
        k = (kf / kst).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
        v = (vf / vs).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
    # the scales stay float32: in float16 a token whose values are all below ~0.008 (int8; ~0.03 fp8) lost
    # precision in its scale (fp8 scales under 6e-8 became 0), records before 2026-11-27 (sixth session) have them
    return {"k": k, "v": v, "ks": ks, "vs": vs}


def key_scale_blocks(n_tokens: int, start: int = 0) -> int:
    """How many blocks of key scales a quantized layer of ``n_tokens`` tokens from position ``start`` has."""
    return max(1, -(-(start % KEY_BLOCK + n_tokens) // KEY_BLOCK))


def per_token_scales(ks: torch.Tensor, n_tokens: int, start: int = 0) -> torch.Tensor:
    """``[B, H, blocks, D]`` key scales as ``[B, H, n_tokens, D]`` for the tokens from position ``start`` (one
    block: ``[B, H, 1, D]``, broadcast)."""
    if ks.shape[-2] == 1:
        return ks
    first = start % KEY_BLOCK
    return ks.repeat_interleave(KEY_BLOCK, dim=-2)[:, :, first:first + n_tokens]


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
    if ks.shape[-2] > 1:  # per block: widened to the tokens on the device, then the same tokens selected
        ks = per_token_scales(ks, parts["k"].shape[-2], start)
        if isinstance(sel, torch.Tensor) and sel.device != ks.device:
            sel = sel.pin_memory().to(ks.device, non_blocking=True) if ks.device.type == "cuda" else sel.to(ks.device)
        ks = ks[:, :, sel]
    vs = move(parts["vs"])
    return (k.float() * ks).to(dtype), (v.float() * vs.float()).to(dtype)

