"""Kernel maximum mean discrepancy between the encoder's latents and samples of p_ref.

MMD^2 with the unbiased U-statistic of Gretton et al. (JMLR 2012, Lemma 6) between the
flattened batch of latents and an equally sized batch drawn from ``prior.sample``:

    MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j)
              - 2/n^2 sum_{i,j} k(x_i, y_j).

Kernel: the mean of RBF kernels exp(-||a - b||^2 / (s * h)) over fixed multipliers s, with h
the median of the pooled off-diagonal squared distances (median heuristic, Gretton et al.
2012, Sec. 8; a mixture of bandwidths as in GMMN, Li et al. 2015, so that no single scale
has to be right). With s = 1 the kernel is exp(-d^2 / (2 sigma^2)) at sigma^2 = h / 2. The
bandwidth is computed without gradient: the encoder must not win by moving the scale.
This is the regulariser of WAE-MMD (Tolstikhin et al., ICLR 2018) applied to the whole latent.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from priors.losses.base import MatchingLoss
from priors.registry import LOSSES


def require_sampler(prior: Any, loss: str) -> None:
    """Sample-based losses need p_ref as samples; name what is missing when they cannot."""
    if prior is None or not callable(getattr(prior, "sample", None)):
        raise ValueError(f"the {loss} loss compares latents with samples of the prior, but got "
                         f"prior={type(prior).__name__} without a sample(n, generator, labels) "
                         f"method; build it with prior=<a registered prior>")


def prior_batch(prior: Any, z: torch.Tensor, labels: torch.Tensor | None,
                generator: torch.Generator) -> torch.Tensor:
    """n prior samples, flattened like z, on z's device. The loss's own CPU generator draws
    them so that a resumed run sees the same reference samples (state in extra_state)."""
    lab = labels.detach().cpu() if isinstance(labels, torch.Tensor) else None
    ref = prior.sample(z.shape[0], generator=generator, labels=lab)
    return ref.reshape(z.shape[0], -1).to(device=z.device, dtype=z.dtype)


def sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ||a||^2 + ||b||^2 - 2 a.b: unlike torch.cdist it has a finite gradient at d = 0.
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2.0 * a @ b.T
    return d.clamp_min(0.0)


@torch.no_grad()
def median_sq_dist(x: torch.Tensor, y: torch.Tensor, max_per_side: int = 256) -> torch.Tensor:
    """Median of the pooled pairwise squared distances (i < j) of x and y; estimated on the first
    max_per_side samples of each side, which costs a quarter at n = 512 for the same median up
    to sampling noise (the samples are i.i.d., so the first ones are a random subset)."""
    pooled = torch.cat([x[:max_per_side], y[:max_per_side]])
    i, j = torch.triu_indices(pooled.shape[0], pooled.shape[0], offset=1, device=x.device)
    return sq_dists(pooled, pooled)[i, j].median().clamp_min(1e-12)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor,
                  multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)
                  ) -> tuple[torch.Tensor, float]:
    """Unbiased MMD^2 between x [n, D] and y [m, D]; returns (estimate, median bandwidth h)."""
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per side, got {n} and {m}")
    dxx, dyy, dxy = sq_dists(x, x), sq_dists(y, y), sq_dists(x, y)
    h = median_sq_dist(x, y)

    def k(d: torch.Tensor) -> torch.Tensor:
        # A running sum rather than stack().mean(): half the time on the CPU at n = 512.
        out = torch.exp(d * (-1.0 / (multipliers[0] * h)))
        for s in multipliers[1:]:
            out = out + torch.exp(d * (-1.0 / (s * h)))
        return out / len(multipliers)

    kxx, kyy, kxy = k(dxx), k(dyy), k(dxy)
    # The diagonals are k(a, a) = 1 exactly; the U-statistic leaves them out.
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean(), float(h)


@LOSSES.register("mmd")
class MMDMatching(MatchingLoss):
    def __init__(self, weight: float = 1.0, *, prior: Any = None,
                 bandwidth_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                 seed: int = 0, latent_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> None:
        # latent_shape, num_classes: passed by the runner to every loss; MMD needs neither.
        super().__init__(weight)
        require_sampler(prior, "mmd")
        mult = tuple(float(s) for s in bandwidth_multipliers)
        if not mult or any(s <= 0 or not math.isfinite(s) for s in mult):
            raise ValueError(f"mmd bandwidth_multipliers must be positive numbers, got {bandwidth_multipliers}")
        # Kept outside the module tree: the prior's own state is saved by the reference stage.
        object.__setattr__(self, "prior", prior)
        self.multipliers = mult
        self.rng = torch.Generator().manual_seed(int(seed))

    def forward(self, z, labels, step, posterior=None):
        x = z.reshape(z.shape[0], -1)
        y = prior_batch(self.prior, z, labels, self.rng)
        loss, h = mmd2_unbiased(x, y, self.multipliers)
        return loss, {"mmd2": float(loss.detach()), "mmd_bandwidth": h}

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.weight, "mmd_kernel": "rbf-mixture/median",
                "mmd_bandwidth_multipliers": list(self.multipliers)}
