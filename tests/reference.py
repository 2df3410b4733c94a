"""Float64 reference quantizers written independently of quant_core (plain formulas, no packing).

Tests compare quant_core's integer kernels against these: an error in scale handling, a transposed
weight or an off-by-one group shows up as a large mismatch.
"""
import torch

F64 = torch.float64


def fake_quant_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Static symmetric int8 activation grid, in float64."""
    return torch.clamp(torch.round(x.to(F64) / scale), -128, 127) * scale


def fake_quant_act_per_row(x2d: torch.Tensor) -> torch.Tensor:
    x = x2d.to(F64)
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def fake_quant_w8(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 of a weight of any rank, in float64."""
    w = weight.to(F64).reshape(weight.shape[0], -1)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return (torch.clamp(torch.round(w / scale), -127, 127) * scale).reshape(weight.shape)


def fake_quant_w4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Grouped int4, two-level scales (channel float * integer group in [1, 16]), in float64."""
    w = weight.to(F64).reshape(weight.shape[0], -1)
    rows, k = w.shape
    out = torch.empty_like(w)
    # Explicit loops over groups: independent of quant_core's view / padding logic.
    ideal = torch.stack([w[:, s:s + group_size].abs().amax(dim=1) / 7 for s in range(0, k, group_size)], dim=1)
    chan = ideal.amax(dim=1, keepdim=True) / 16
    gscale = torch.clamp(torch.ceil(ideal / chan - 1e-6), 1, 16)
    for j, start in enumerate(range(0, k, group_size)):
        step = chan[:, 0] * gscale[:, j]
        block = w[:, start:start + group_size]
        out[:, start:start + group_size] = torch.clamp(torch.round(block / step[:, None]), -8, 7) * step[:, None]
    return out.reshape(weight.shape)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach().to(F64)
    return float((actual.to(F64) - expected).norm() / expected.norm())
