"""Per-image reconstruction metrics: PSNR and SSIM.

SSIM follows Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 13(4), 2004, with the constants of its
reference implementation (ssim_index.m): 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, statistics only where the window fits inside the image ('valid' filtering). Each
channel is scored separately and the SSIM map is averaged over channels and pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images [N, C, H, W], got {tuple(x.shape)}")
    x, y = x.detach().double(), y.detach().double()  # float64: exact enough to test against
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(f"{what}: inputs contain NaN or inf")
    return x, y


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, [N]; inf where x == y."""
    x, y = _check_pair(x, y, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf, as it should


def _gaussian_window(device: torch.device) -> torch.Tensor:
    r = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(r**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)  # separable Gaussian, sums to 1 (fspecial('gaussian', 11, 1.5))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per image, [N]; 1 where x == y."""
    x, y = _check_pair(x, y, "ssim")
    n, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    window = _gaussian_window(x.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:  # depthwise: each channel on its own
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    # Local (co)variances as E[ab] - E[a]E[b] under the window weights, as in ssim_index.m.
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
