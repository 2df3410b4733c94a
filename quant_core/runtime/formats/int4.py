"""Grouped int4 weights with two-level scales (QServe style), packed two codes per byte.

Within each group of ``group_size`` weights along K, ``W8 = q4 * group_scale`` with a signed 4-bit
code ``q4`` in [-8, 7] and a small *integer* ``group_scale`` in [1, 16]. Since 8 * 16 = 128 the
product is always a valid int8, so unpacking is exact and per-group scales never have to be applied
after the int32 accumulation; a float scale per output channel does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import (GROUP_SCALE_MAX, INT4_QMAX, INT4_QMIN, SUPPORTED_GROUP_SIZES, _EPS, as_2d_float, as_dtype,
                     clip_vector, where_rows)
from ..compat import is_compiling


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


def padded_width(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def int4_to_int8(packed: torch.Tensor, group_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Exact int8 weight (N, K) from packed int4 codes and integer group scales."""
    if _UNPACK_PADDED_OP is not None and packed.shape[1] * 2 != in_features and is_compiling():
        return _UNPACK_PADDED_OP(packed, group_scale, in_features)
    return _int4_to_int8(packed, group_scale, in_features)


def _int4_to_int8(packed: torch.Tensor, group_scale: torch.Tensor, in_features: int) -> torch.Tensor:
    rows, n_groups = group_scale.shape
    k_pad = packed.shape[1] * 2
    codes = unpack_int4(packed, k_pad // n_groups)
    w8 = codes.view(rows, n_groups, k_pad // n_groups) * group_scale.view(torch.int8).unsqueeze(2)
    w8 = w8.view(rows, k_pad)
    return w8 if k_pad == in_features else w8[:, :in_features].contiguous()


def _register_unpack_op():
    """Under torch.compile, the unpack of a weight whose K is padded to the group size runs as one opaque op:
    Inductor (torch 2.13, CPU) fused the final column slice into garbage reads (tests/test_compile.py)."""
    if not hasattr(torch.library, "custom_op"):
        return None
    op = torch.library.custom_op("fidelityquant::int4_to_int8_padded", mutates_args=())(_int4_to_int8)
    op.register_fake(lambda packed, group_scale, in_features: packed.new_empty(
        (packed.shape[0], in_features), dtype=torch.int8))
    return op


_UNPACK_PADDED_OP = _register_unpack_op()


@dataclass(frozen=True)
class Int4Weight:
    """Grouped int4 weight with two-level scales; see the module docstring."""

    packed: torch.Tensor         # uint8 (N, K_padded / 2), "halves" layout per group (see pack_int4)
    group_scale: torch.Tensor    # uint8 (N, K_padded / group_size), integers in [1, 16]
    channel_scale: torch.Tensor  # float32 (N,)
    in_features: int             # K before padding to a multiple of group_size
    group_size: int

    bits = 4
    grouped = True
    patch_as_int8 = True  # a weight patch off this grid is held as int8 per row, not re-rounded on int4
    qmin, qmax = INT4_QMIN, INT4_QMAX

    @staticmethod
    def storage_layout(rows: int, reduce_dim: int, group_size: int, weight_shape: tuple) -> dict:
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
        k_pad = padded_width(reduce_dim, group_size)
        return {"weight": ((rows, k_pad // 2), torch.uint8), "weight_group_scale": ((rows, k_pad // group_size), torch.uint8)}

    def storage(self, weight_shape: tuple) -> dict:
        return {"weight": self.packed, "weight_group_scale": self.group_scale}

    @staticmethod
    def storage_to_int8(weight: torch.Tensor, buffers: dict, reduce_dim: int) -> torch.Tensor:
        return int4_to_int8(weight, buffers["weight_group_scale"], reduce_dim)

    @classmethod
    def from_storage(cls, tensors: dict, channel_scale: torch.Tensor, reduce_dim: int, group_size: int):
        packed = as_dtype(tensors["weight"], torch.uint8)
        return cls(packed, tensors["weight_group_scale"].to(packed.device), channel_scale, reduce_dim, group_size)

    @classmethod
    def from_float(cls, w2d: torch.Tensor, clip=None, per_tensor: bool = False, group_size: int = 64) -> "Int4Weight":
        return quantize_int4_grouped(w2d, group_size, clip, per_tensor)

    def to_int8(self) -> torch.Tensor:
        return int4_to_int8(self.packed, self.group_scale, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.to_int8().float() * self.channel_scale.float().unsqueeze(1)

    def step_multiplier(self, cols: slice = slice(None)) -> torch.Tensor:
        group = torch.arange(self.in_features, device=self.group_scale.device)[cols] // self.group_size
        return self.group_scale.float()[:, group]

    def grid_step(self, cols: slice = slice(None)) -> torch.Tensor:
        return self.channel_scale.float().unsqueeze(1) * self.step_multiplier(cols)

    def _pack(self, q4: torch.Tensor, channel_scale: torch.Tensor) -> "Int4Weight":
        k_pad = self.group_scale.shape[1] * self.group_size
        q4 = q4.to(torch.int8)
        if q4.shape[1] != k_pad:
            q4 = F.pad(q4, (0, k_pad - q4.shape[1]))
        return Int4Weight(pack_int4(q4, self.group_size), self.group_scale, channel_scale,
                          self.in_features, self.group_size)

    def with_codes(self, codes: torch.Tensor) -> "Int4Weight":
        return self._pack(codes.clamp(self.qmin, self.qmax), self.channel_scale)

    def requantize(self, w2d: torch.Tensor, channel_scale: torch.Tensor | None = None) -> "Int4Weight":
        scale = self.channel_scale if channel_scale is None else channel_scale
        w = w2d.detach().to(torch.float32)
        rows, n_groups = self.group_scale.shape
        k_pad = n_groups * self.group_size
        if k_pad != w.shape[1]:
            w = F.pad(w, (0, k_pad - w.shape[1]))
        step = (scale.to(w.device, torch.float32).unsqueeze(1).unsqueeze(2)
                * self.group_scale.to(w.device, torch.float32).unsqueeze(2))
        q4 = torch.round(w.view(rows, n_groups, self.group_size) / step).clamp_(INT4_QMIN, INT4_QMAX)
        return Int4Weight(pack_int4(q4.to(torch.int8).view(rows, k_pad), self.group_size),
                          self.group_scale, scale, self.in_features, self.group_size)

    def where_rows(self, mask: torch.Tensor, other: "Int4Weight") -> "Int4Weight":
        return Int4Weight(where_rows(mask, self.packed, other.packed),
                          where_rows(mask, self.group_scale, other.group_scale),
                          where_rows(mask, self.channel_scale, other.channel_scale),
                          self.in_features, self.group_size)


def quantize_int4_grouped(weight: torch.Tensor, group_size: int = 64, clip=None,
                          per_tensor: bool = False) -> Int4Weight:
    """Quantize a (N, K) weight to grouped int4 with a float channel scale and integer group scales.

    K is zero-padded to a multiple of ``group_size``; padding quantizes to code 0 and is cut off again
    when unpacking. ``per_tensor`` uses one step for the whole tensor (the naive baseline).
    """
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    w = as_2d_float(weight)
    rows, in_features = w.shape
    k_pad = padded_width(in_features, group_size)
    if k_pad != in_features:
        w = F.pad(w, (0, k_pad - in_features))
    groups = w.view(rows, k_pad // group_size, group_size)

    # Ideal float scale per group, then factor it as channel_scale * integer group_scale.
    clip_col = clip_vector(clip, rows, w.device)
    group_amax = groups.abs().amax(dim=2)
    if per_tensor:
        group_amax = group_amax.amax().expand_as(group_amax)
    ideal = group_amax * clip_col / INT4_QMAX
    channel_scale = (ideal.amax(dim=1, keepdim=True) / GROUP_SCALE_MAX).clamp_min(_EPS)
    # ceil, not round: a rounded-down group scale would saturate that group's largest weights.
    group_scale = torch.ceil(ideal / channel_scale - 1e-6).clamp_(1, GROUP_SCALE_MAX)

    step = (channel_scale * group_scale).unsqueeze(2)
    codes = torch.round(groups / step).clamp_(INT4_QMIN, INT4_QMAX).to(torch.int8)
    return Int4Weight(pack_int4(codes.view(rows, k_pad), group_size), group_scale.to(torch.uint8),
                      channel_scale.squeeze(1), in_features, group_size)
