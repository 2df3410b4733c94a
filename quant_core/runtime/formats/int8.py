"""int8 weights: one float32 scale per output channel (symmetric, codes in [-127, 127])."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import INT8_QMAX, as_2d_float, as_dtype, clip_vector, where_rows, _EPS


def quantize_int8_per_channel(weight: torch.Tensor, clip=None, per_tensor: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per row of a (N, K) weight.

    ``clip`` (scalar or one value per row) shrinks the range: values beyond ``clip * amax`` saturate.
    ``per_tensor`` gives every row the whole tensor's range (the naive baseline's granularity).
    Returns (int8 codes (N, K), float32 scales (N,)).
    """
    w = as_2d_float(weight)
    amax = w.abs().amax().expand(w.shape[0], 1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    amax = amax * clip_vector(clip, w.shape[0], w.device)
    scale = (amax / INT8_QMAX).clamp_min(_EPS)
    codes = torch.round(w / scale).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return codes, scale.squeeze(1)


@dataclass(frozen=True)
class Int8Weight:
    """int8 codes (N, K) with one float32 scale per output channel."""

    codes: torch.Tensor          # int8 (N, K)
    channel_scale: torch.Tensor  # float32 (N,)

    bits = 8
    grouped = False
    patch_as_int8 = False  # a weight patch off this grid: grow the scales of saturating rows instead
    qmin, qmax = -INT8_QMAX, INT8_QMAX

    # Storage: how a layer holds the value (beside its float32 channel scale ``weight_scale``).
    @staticmethod
    def storage_layout(rows: int, reduce_dim: int, group_size: int, weight_shape: tuple) -> dict:
        """{tensor name: (shape, dtype)}; ``weight`` keeps the float weight's shape (state-dict compatible)."""
        return {"weight": (tuple(weight_shape), torch.int8)}

    def storage(self, weight_shape: tuple) -> dict:
        return {"weight": self.codes.reshape(weight_shape)}

    @staticmethod
    def storage_to_int8(weight: torch.Tensor, buffers: dict, reduce_dim: int) -> torch.Tensor:
        """The exact int8 (N, K) straight from stored tensors (the per-call path: no value object)."""
        return weight.view(weight.shape[0], -1)

    @classmethod
    def from_storage(cls, tensors: dict, channel_scale: torch.Tensor, reduce_dim: int, group_size: int):
        codes = as_dtype(tensors["weight"], torch.int8)
        return cls(codes.reshape(codes.shape[0], -1), channel_scale)

    @classmethod
    def from_float(cls, w2d: torch.Tensor, clip=None, per_tensor: bool = False, group_size: int = 0) -> "Int8Weight":
        codes, scale = quantize_int8_per_channel(w2d, clip, per_tensor)
        return cls(codes, scale)

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def to_int8(self) -> torch.Tensor:
        return self.codes

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.channel_scale.float().unsqueeze(1)

    def step_multiplier(self, cols: slice = slice(None)) -> torch.Tensor:
        """Integer factor between a code and its int8 value, per weight (N, K[cols]): 1 for int8."""
        return torch.ones(self.codes[:, cols].shape, device=self.codes.device)

    def grid_step(self, cols: slice = slice(None)) -> torch.Tensor:
        """The float step of every weight (N, K[cols]): a code times this is the dequantized weight."""
        return self.channel_scale.float().unsqueeze(1) * self.step_multiplier(cols)

    def with_codes(self, codes: torch.Tensor) -> "Int8Weight":
        """Same scales, other integer codes (N, K) on this grid."""
        return Int8Weight(codes.clamp(self.qmin, self.qmax).to(torch.int8), self.channel_scale)

    @classmethod
    def on_scale(cls, w2d: torch.Tensor, channel_scale: torch.Tensor) -> "Int8Weight":
        """A float weight rounded onto given channel scales; values beyond the range saturate."""
        w = w2d.detach().to(torch.float32)
        codes = torch.round(w / channel_scale.to(w.device, torch.float32).unsqueeze(1)).clamp_(-INT8_QMAX, INT8_QMAX)
        return cls(codes.to(torch.int8), channel_scale)

    def requantize(self, w2d: torch.Tensor, channel_scale: torch.Tensor | None = None) -> "Int8Weight":
        """A float weight rounded onto this grid (optionally with other channel scales); saturates."""
        return Int8Weight.on_scale(w2d, self.channel_scale if channel_scale is None else channel_scale)

    def where_rows(self, mask: torch.Tensor, other: "Int8Weight") -> "Int8Weight":
        """Rows of ``self`` where ``mask``, else rows of ``other`` (same format and shape)."""
        return Int8Weight(where_rows(mask, self.codes, other.codes),
                          where_rows(mask, self.channel_scale, other.channel_scale))
