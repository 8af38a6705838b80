"""Synthetic priors with exact scores: N(0, I) and a K-component Gaussian mixture.

Path (SiT convention, t = 1 is data): x_t = t z + (1 - t) eps. For a Gaussian component
z ~ N(m, s^2 I), x_t ~ N(t m, (t^2 s^2 + (1 - t)^2) I) and the posterior means are linear in
x_t, so the optimal velocity E[z - eps | x_t] is available in closed form (derivation in the
README's "exact teachers" note). The paper uses both as synthetic references (Table 1).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from priors.base import FitContext
from priors.registry import PRIORS


def _bshape(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


@PRIORS.register("gaussian")
class GaussianPrior:
    """Standard normal over the whole latent tensor."""
    class_conditional = False

    def __init__(self, latent_shape: tuple[int, int, int], seed: int = 0, label: str | None = None) -> None:
        # seed: N(0, I) draws nothing when built; taken so that every prior accepts `prior.seed`.
        self.name = label or "gaussian"
        self.latent_shape = tuple(latent_shape)

    def fit(self, ctx: FitContext) -> None:
        return None

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.randn(n, *self.latent_shape, generator=generator)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Cov(z - eps, x_t) = t - (1 - t); Var(x_t) = t^2 + (1 - t)^2.
        t = _bshape(t, x_t)
        return (2 * t - 1) / (t * t + (1 - t) ** 2) * x_t

    def state_dict(self) -> dict[str, Any]:
        return {"latent_shape": torch.tensor(self.latent_shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = tuple(int(v) for v in state["latent_shape"])
        if shape != self.latent_shape:
            raise ValueError(f"gaussian prior state has latent shape {shape}, expected {self.latent_shape}")


@PRIORS.register("gmm")
class GMMPrior:
    """Isotropic K-component mixture with equal weights; seeded means.

    Means are drawn N(0, (1 - s^2) I) so that the mixture has about unit variance per
    dimension, matching the scale of the Gaussian prior (K = 10 as in the paper's Table 1).
    """
    class_conditional = False

    def __init__(self, latent_shape: tuple[int, int, int], num_components: int = 10,
                 component_std: float = 0.5, seed: int = 0, label: str | None = None) -> None:
        if not 0 < component_std < 1:
            raise ValueError(f"gmm component_std must be in (0, 1), got {component_std}")
        if num_components < 1:
            raise ValueError(f"gmm num_components must be >= 1, got {num_components}")
        self.name = label or "gmm"
        self.latent_shape = tuple(latent_shape)
        self.k = int(num_components)
        self.s = float(component_std)
        g = torch.Generator().manual_seed(int(seed))
        dim = math.prod(self.latent_shape)
        self.means = torch.randn(self.k, dim, generator=g) * math.sqrt(1 - self.s ** 2)

    def fit(self, ctx: FitContext) -> None:
        return None

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        comp = torch.randint(self.k, (n,), generator=generator)
        z = self.means[comp] + self.s * torch.randn(n, self.means.shape[1], generator=generator)
        return z.reshape(n, *self.latent_shape)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        x = x_t.reshape(n, -1).double()
        tt = t.reshape(n, 1).double()
        var = tt ** 2 * self.s ** 2 + (1 - tt) ** 2                  # per-component variance of x_t
        means = self.means.to(device=x.device, dtype=torch.float64)
        diff = x[:, None, :] - tt[:, :, None] * means[None]           # [n, K, D]
        logp = -0.5 * (diff ** 2).sum(-1) / var                        # equal weights, shared var
        r = torch.softmax(logp, dim=1)                                 # responsibilities [n, K]
        # E[z | x_t, k] - E[eps | x_t, k] = m_k + (t s^2 - (1 - t)) / var * (x_t - t m_k)
        coef = (tt * self.s ** 2 - (1 - tt)) / var                     # [n, 1]
        v = (r[:, :, None] * (means[None] + coef[:, :, None] * diff)).sum(1)
        return v.to(x_t.dtype).reshape_as(x_t)

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.clone(), "component_std": torch.tensor(self.s)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["means"].shape != self.means.shape:
            raise ValueError(f"gmm state has means {tuple(state['means'].shape)}, "
                             f"expected {tuple(self.means.shape)}")
        self.means = state["means"].clone()
        self.s = float(state["component_std"])
