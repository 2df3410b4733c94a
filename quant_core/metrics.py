"""Image fidelity metrics: PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected image batches (N, C, H, W), got shape {tuple(a.shape)}")
    return a.detach().double(), b.detach().double()


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error, (N,)."""
    a, b = _check(a, b)
    return (a - b).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, data_range]; identical images give +inf."""
    return 10 * torch.log10(data_range ** 2 / mse(a, b))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return (g / g.sum()).unsqueeze(0)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (mean over channels and valid window positions), (N,).

    Images smaller than the 11-pixel window use a window as large as the image allows.
    """
    a, b = _check(a, b)
    channels = a.shape[1]
    size = min(11, a.shape[2], a.shape[3])
    size -= (size + 1) % 2  # odd window
    g = _gaussian_window(size, 1.5 * size / 11)
    window_h = g.view(1, 1, 1, size).expand(channels, 1, 1, size)
    window_v = g.view(1, 1, size, 1).expand(channels, 1, size, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, window_h, groups=channels), window_v, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
