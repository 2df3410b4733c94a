"""What every weight format shares: ranges, clip ratios, dtype and row helpers."""
from __future__ import annotations

import torch

INT8_QMAX = 127
INT4_QMIN, INT4_QMAX = -8, 7
GROUP_SCALE_MAX = 16  # 8 * 16 = 128 keeps q4 * group_scale inside int8
SUPPORTED_GROUP_SIZES = (32, 64, 128)
_EPS = 1e-12


# ----------------------------------------------------------------------------- codecs

def clip_vector(clip, rows: int, device) -> torch.Tensor:
    """Per-output-channel clipping ratio in (0, 1] as a float32 column vector."""
    if clip is None:
        return torch.ones(rows, 1, device=device)
    clip = torch.as_tensor(clip, dtype=torch.float32, device=device).reshape(-1, 1)
    if clip.shape[0] not in (1, rows):
        raise ValueError(f"clip ratio has {clip.shape[0]} entries, expected 1 or {rows}")
    if bool((clip <= 0).any()) or bool((clip > 1).any()):
        raise ValueError("clip ratios must lie in (0, 1]")
    return clip.expand(rows, 1)


def as_2d_float(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    return w



def as_dtype(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored codes back in their dtype (a host may hand over a float copy of them)."""
    if codes.dtype == dtype:
        return codes
    return codes.round().to(dtype) if codes.is_floating_point() else codes.to(dtype)


def where_rows(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))).to(a.device), a, b)
