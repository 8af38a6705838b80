"""Samplers for the velocity model: integrate from t = 0 (noise) to t = 1 (data).

ODE: dx/dt = v(x, t) (the probability-flow ODE of the linear path), Euler or Heun.

SDE (Euler-Maruyama). For any diffusion coefficient w(t) >= 0 the SDE

    dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW,    s = score = -eps_hat / (1 - t),

has the same marginals as the ODE (the extra drift w s and the diffusion cancel in the
Fokker-Planck equation). We use SiT's default diffusion form "sigma", w(t) = sigma_t = 1 - t
(Ma et al., 2024, SiT code `--diffusion-form sigma`, norm 1). The score term then needs no
division: w s = -(x - t v), so the drift is (1 + t) v - x and the noise scale sqrt(2 (1 - t) dt)
vanishes at the data end. The last step is deterministic: it jumps to the clean estimate
x + (1 - t) v, which is both the posterior mean E[z | x_t] and an Euler step of the ODE
(SiT's "Mean" last step plays the same role).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from .transport import shift_time, velocity_to_eps, velocity_to_x1

logger = logging.getLogger(__name__)

METHODS = ("euler", "heun", "euler_maruyama")


def guided_velocity(
    model: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor, cfg_scale: float = 1.0
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022) on velocities:
    v = v_c + (w - 1)(v_c - v_u), with the unconditional pass at y = model.null_label.

    At w == 1 only the conditional forward runs, so the result equals model(x, t, y) bitwise.
    The model must be in eval mode (FlowDiT drops labels in training mode).
    """
    if cfg_scale == 1.0:
        return model(x, t, y)
    y_null = torch.full_like(y, model.null_label)
    # One batched forward for both branches, as DiT's forward_with_cfg does.
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
    v_c, v_u = v.chunk(2)
    return v_c + (cfg_scale - 1.0) * (v_c - v_u)


def time_grid(steps: int, time_shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """steps + 1 times from 0 to 1; time_shift > 1 spends more steps near the noise end."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), time_shift).to(
        device=device, dtype=torch.float32
    )


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    y: Tensor,
    steps: int = 50,
    method: str = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    time_shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Map noise [N, C, H, W] at t = 0 to samples at t = 1.

    Guidance is applied where cfg_interval[0] <= t <= cfg_interval[1] (conditional velocity
    elsewhere). `generator` drives the SDE noise of "euler_maruyama" (the ODE methods are
    deterministic given `noise`). NFE: euler = steps, heun = 2 * steps, euler_maruyama = steps.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; known: {METHODS}")
    lo, hi = cfg_interval
    ts = time_grid(steps, time_shift, noise.device)
    n = noise.shape[0]

    def velocity(x: Tensor, t: float) -> Tensor:
        w = cfg_scale if lo <= t <= hi else 1.0
        return guided_velocity(model, x, torch.full((n,), t, device=x.device), y, w)

    x = noise
    for i in range(steps):
        t, t_next = ts[i].item(), ts[i + 1].item()
        dt = t_next - t
        v = velocity(x, t)
        if method == "euler":
            x = x + dt * v
        elif method == "heun":
            x_pred = x + dt * v
            x = x + 0.5 * dt * (v + velocity(x_pred, t_next))
        elif i == steps - 1:
            x = velocity_to_x1(x, v, torch.full((n,), t, device=x.device))
        else:
            # drift (1 + t) v - x  ==  v + w s  with w = 1 - t and s = -eps_hat / (1 - t)
            drift = v - velocity_to_eps(x, v, torch.full((n,), t, device=x.device))
            dw = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + dt * drift + (2.0 * (1.0 - t) * dt) ** 0.5 * dw
    return x


def balanced_labels(n: int, num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... (round-robin). When K does not divide n the first
    n % K classes get one sample more; FID protocols (50 per class for 50K) divide exactly."""
    return torch.arange(n, device=device) % num_classes


def random_labels(
    n: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    return torch.randint(0, num_classes, (n,), generator=generator, device=device)
