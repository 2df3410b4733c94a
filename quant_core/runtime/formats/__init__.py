"""Weight formats as values: int8 per output channel (``int8.py``), grouped int4 with two-level scales (``int4.py``).

Every format ends in the same place: an exact int8 matrix W8 (N, K) and a float scale per output
channel, ``W ~= W8 * channel_scale[:, None]``, so one int8 GEMM does the work whatever the format.

A value knows its grid (the step of every weight), so fitting can round on it code by code,
layers can run it, a weight patch (LoRA) can be requantized onto it and the artifact can store
it. A new format is one class with the same methods plus an entry in :data:`FORMATS`.
"""
from __future__ import annotations

import torch

from .common import GROUP_SCALE_MAX, INT4_QMAX, INT4_QMIN, INT8_QMAX, SUPPORTED_GROUP_SIZES
from .int4 import Int4Weight, int4_to_int8, pack_int4, padded_width, quantize_int4_grouped, unpack_int4
from .int8 import Int8Weight, quantize_int8_per_channel

# Formats by weight bits: the only place that maps a precision to its code.
FORMATS = {8: Int8Weight, 4: Int4Weight}


def format_for(bits: int):
    if bits not in FORMATS:
        raise ValueError(f"weight_bits must be one of {sorted(FORMATS)}, got {bits}")
    return FORMATS[bits]


def quantize_weight(w2d: torch.Tensor, bits: int, group_size: int = 64, clip=None, per_tensor: bool = False):
    """A float (N, K) weight in the format for ``bits``."""
    return format_for(bits).from_float(w2d, clip=clip, per_tensor=per_tensor, group_size=group_size)


__all__ = ["FORMATS", "GROUP_SCALE_MAX", "INT4_QMAX", "INT4_QMIN", "INT8_QMAX", "Int4Weight", "Int8Weight",
           "SUPPORTED_GROUP_SIZES", "format_for", "int4_to_int8", "pack_int4", "padded_width", "quantize_int4_grouped",
           "quantize_int8_per_channel", "quantize_weight", "unpack_int4"]
