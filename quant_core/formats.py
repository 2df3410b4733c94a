"""Weight formats: symmetric int8 per output channel, and grouped int4 with two-level scales.

Both formats end in the same place: an int8 matrix W8 (N, K) and a float scale per output
channel, so that ``W ~= W8 * channel_scale[:, None]`` and one int8 GEMM does the work.

W4A8 (QServe-style two-level scales): within each group of ``group_size`` weights along K,
``W8 = q4 * group_scale`` where ``q4`` is a signed 4-bit code in [-8, 7] and ``group_scale`` is a
small *integer* in [1, 16]. Since 8 * 16 = 128 the product is always a valid int8, so unpacking is
exact and per-group scales never have to be applied after the int32 accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7
GROUP_SCALE_MAX = 16  # 8 * 16 = 128 keeps q4 * group_scale inside int8
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_EPS = 1e-12


def _clip_vector(clip, rows: int, device) -> torch.Tensor:
    """Per-output-channel clipping ratio in (0, 1] as a float32 column vector."""
    if clip is None:
        return torch.ones(rows, 1, device=device)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=device).reshape(-1, 1)
    if clip.shape[0] not in (1, rows):
        raise ValueError(f"clip ratio has {clip.shape[0]} entries, expected 1 or {rows}")
    if bool((clip <= 0).any()) or bool((clip > 1).any()):
        raise ValueError("clip ratios must lie in (0, 1]")
    return clip.expand(rows, 1)


def quantize_int8_per_channel(weight: torch.Tensor, clip=None, per_tensor: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row of a (N, K) weight.

    ``clip`` (scalar or one value per row) shrinks the range: values beyond ``clip * amax`` saturate.
    ``per_tensor`` gives every row the whole tensor's range (the naive baseline's granularity).
    Returns (int8 codes (N, K), float32 scales (N,)).
    """
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    amax = w.abs().amax().expand(w.shape[0], 1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    amax = amax * _clip_vector(clip, w.shape[0], w.device)
    scale = (amax / INT8_QMAX).clamp_min(_EPS)
    codes = torch.round(w / scale).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return codes, scale.squeeze(1)


def pack_int4(codes: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Pack signed 4-bit codes (int8 values in [-8, 7]) two per byte.

    Within each block of ``block`` columns (default: the whole last dim; the int4 weight uses its
    group size), byte j holds element j in the low nibble and element j + block/2 in the high nibble.
    This "halves" layout unpacks with one concatenation instead of a stride-2 interleave, which
    measured about 2x faster (bench/RESULTS.md).
    """
    width = codes.shape[-1]
    block = block or width
    if block % 2 or width % block:
        raise ValueError(f"int4 packing needs an even block size dividing the width, got {block} for {width}")
    nibbles = (codes.to(torch.uint8) & 0x0F).reshape(*codes.shape[:-1], width // block, block)
    half = block // 2
    packed = nibbles[..., :half] | (nibbles[..., half:] << 4)
    return packed.reshape(*codes.shape[:-1], width // 2)


def unpack_int4(packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., K/2) -> int8 codes (..., K) in [-8, 7]."""
    width = packed.shape[-1] * 2
    block = block or width
    signed = packed.view(torch.int8).reshape(*packed.shape[:-1], width // block, block // 2)
    low = (signed << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = signed >> 4
    return torch.cat((low, high), dim=-1).reshape(*packed.shape[:-1], width)


@dataclass
class Int4Weight:
    """Grouped int4 weight with two-level scales; see module docstring."""

    packed: torch.Tensor         # uint8 (N, K_padded / 2), "halves" layout per group (see pack_int4)
    group_scale: torch.Tensor    # uint8 (N, K_padded / group_size), integers in [1, 16]
    channel_scale: torch.Tensor  # float32 (N,)
    in_features: int             # K before padding to a multiple of group_size
    group_size: int

    def to_int8(self) -> torch.Tensor:
        return int4_to_int8(self.packed, self.group_scale, self.in_features)


def padded_width(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def quantize_int4_grouped(weight: torch.Tensor, group_size: int = 64, clip=None,
                          per_tensor: bool = False) -> Int4Weight:
    """Quantize a (N, K) weight to grouped int4 with a float channel scale and integer group scales.

    K is zero-padded to a multiple of ``group_size``; padding quantizes to code 0 and is cut off again
    when unpacking. ``per_tensor`` uses one step for the whole tensor (the naive baseline).
    """
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, in_features = w.shape
    k_pad = padded_width(in_features, group_size)
    if k_pad != in_features:
        w = torch.nn.functional.pad(w, (0, k_pad - in_features))
    groups = w.view(rows, k_pad // group_size, group_size)

    # Ideal float scale per group, then factor it as channel_scale * integer group_scale.
    clip_col = _clip_vector(clip, rows, w.device)
    group_amax = groups.abs().amax(dim=2)
    if per_tensor:
        group_amax = group_amax.amax().expand_as(group_amax)
    group_amax = group_amax * clip_col
    ideal = group_amax / INT4_QMAX
    channel_scale = (ideal.amax(dim=1, keepdim=True) / GROUP_SCALE_MAX).clamp_min(_EPS)
    # ceil, not round: a rounded-down group scale would saturate that group's largest weights.
    group_scale = torch.ceil(ideal / channel_scale - 1e-6).clamp_(1, GROUP_SCALE_MAX)

    step = (channel_scale * group_scale).unsqueeze(2)
    codes = torch.round(groups / step).clamp_(INT4_QMIN, INT4_QMAX).to(torch.int8)
    return Int4Weight(
        packed=pack_int4(codes.view(rows, k_pad), group_size),
        group_scale=group_scale.to(torch.uint8),
        channel_scale=channel_scale.squeeze(1),
        in_features=in_features,
        group_size=group_size,
    )


def int4_to_int8(packed: torch.Tensor, group_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact int8 weight (N, K) from packed int4 codes and integer group scales."""
    rows, n_groups = group_scale.shape
    k_pad = packed.shape[1] * 2
    codes = unpack_int4(packed, k_pad // n_groups)
    w8 = codes.view(rows, n_groups, k_pad // n_groups) * group_scale.view(torch.int8).unsqueeze(2)
    w8 = w8.view(rows, k_pad)
    return w8 if k_pad == in_features else w8[:, :in_features].contiguous()
