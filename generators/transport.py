"""The probability path, in one place: the generator, the samplers and the DM loss import it.

Linear (rectified-flow) path in the SiT convention (Ma et al., 2024), t = 1 is clean data:

    x_t = t * z + (1 - t) * eps,   eps ~ N(0, I)
    v   = d x_t / dt = z - eps                       (the network's target)
    z   = x_t + (1 - t) * v                          (clean estimate from a velocity)
    eps = x_t - t * v                                (noise estimate from a velocity)

Time shift. SD3 (Esser et al., 2024, Sec. 5.3.2) shifts the noise level sigma in [0, 1] (1 = noise)
by sigma' = s * sigma / (1 + (s - 1) * sigma). With sigma = 1 - t this reads

    t' = t / (t + s * (1 - t)),

so s > 1 moves time towards the noise end (t -> 0): more training samples / sampler steps at
high noise, which high-dimensional latents need (LightningDiT samples with this shift). s = 1 is
the identity, and 0 and 1 are fixed points.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

T_KINDS = ("uniform", "logit_normal", "shifted")


def _expand(t: Tensor, like: Tensor) -> Tensor:
    # Broadcast a per-sample time [N] over the remaining dimensions of `like`.
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(z: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    t = _expand(t, z)
    return t * z + (1 - t) * eps


def velocity_target(z: Tensor, eps: Tensor) -> Tensor:
    return z - eps


def velocity_to_x1(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Clean-data estimate x_hat = x_t + (1 - t) v (exactly z when v is the true velocity)."""
    return x_t + (1 - _expand(t, x_t)) * v


def velocity_to_eps(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """Noise estimate eps_hat = x_t - t v; the score is -eps_hat / (1 - t)."""
    return x_t - _expand(t, x_t) * v


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift written for t = 1 = data (see the module docstring)."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return t / (t + shift * (1 - t))


def sample_t(
    n: int,
    kind: str = "uniform",
    t_range: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n training times.

    kind: "uniform" (U[0, 1]); "logit_normal" (sigmoid of N(0, 1), SD3's default, which puts
    most mass mid-path); "shifted" (U[0, 1] pushed through shift_time, the SD3 / LightningDiT
    shift; with shift=1 it equals "uniform"). The shift is applied to every kind, and the result
    is mapped affinely into t_range = (t0, t1), so t always lies in [t0, t1].
    """
    if kind == "uniform" or kind == "shifted":
        u = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown t kind {kind!r}; known: {T_KINDS}")
    t0, t1 = t_range
    if not 0.0 <= t0 <= t1 <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= t0 <= t1 <= 1, got {t_range}")
    return t0 + (t1 - t0) * shift_time(u, shift)


def flow_matching_loss(
    model: Callable[..., Tensor],
    z: Tensor,
    y: Tensor,
    t_kind: str = "uniform",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean squared error between model(x_t, t, y) and the velocity z - eps (scalar).

    With a generator, eps, t and the model's label dropout all draw from it (the model must
    then accept a `generator` keyword, as FlowDiT does), so a seeded step is reproducible.
    """
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    t = sample_t(z.shape[0], t_kind, shift=shift, generator=generator, device=z.device)
    x_t = interpolate(z, eps, t)
    kwargs = {} if generator is None else {"generator": generator}
    v = model(x_t, t, y, **kwargs)
    return F.mse_loss(v.float(), velocity_target(z, eps).float())
