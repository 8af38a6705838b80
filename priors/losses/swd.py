"""Sliced Wasserstein-2 between the encoder's latents and samples of p_ref.

SW_2^2(q, p) = E_theta W_2^2(theta # q, theta # p) over unit directions theta (Bonneel et al.
2015; used as an autoencoder regulariser by Kolouri et al., ICLR 2019, SWAE). In one dimension
the optimal coupling of two equal-size empirical measures pairs the sorted samples, so

    loss = mean_{theta, i} (sort(x theta)_i - sort(y theta)_i)^2

with n_projections fresh Gaussian directions per call (normalised to the unit sphere). The
gradient flows through the sort's values into z. The benchmark's tokenizer stage reports the
same quantity (square-rooted) as ``latent_swd_to_prior``.
"""
from __future__ import annotations

from typing import Any

import torch

from priors.losses.base import MatchingLoss
from priors.losses.mmd import prior_batch, require_sampler
from priors.registry import LOSSES


def random_directions(dim: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[dim, n] unit vectors, uniform on the sphere (normalised Gaussians)."""
    theta = torch.randn(dim, n, generator=generator)
    return theta / theta.norm(dim=0, keepdim=True)


def sliced_w2_sq(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo SW_2^2 between equal-size point sets x, y [n, D] along directions theta [D, P]."""
    if x.shape != y.shape:
        raise ValueError(f"sliced W2 pairs sorted samples: x and y need equal shapes, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    px = (x @ theta).sort(dim=0).values
    py = (y @ theta).sort(dim=0).values
    return (px - py).pow(2).mean()


@LOSSES.register("swd")
class SlicedWasserstein(MatchingLoss):
    def __init__(self, weight: float = 1.0, *, prior: Any = None, n_projections: int = 128,
                 seed: int = 0, latent_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None) -> None:
        # latent_shape, num_classes: passed by the runner to every loss; SWD needs neither.
        super().__init__(weight)
        require_sampler(prior, "swd")
        if n_projections < 1:
            raise ValueError(f"swd n_projections must be >= 1, got {n_projections}")
        # Kept outside the module tree: the prior's own state is saved by the reference stage.
        object.__setattr__(self, "prior", prior)
        self.n_projections = int(n_projections)
        self.rng = torch.Generator().manual_seed(int(seed))

    def forward(self, z, labels, step, posterior=None):
        x = z.reshape(z.shape[0], -1)
        y = prior_batch(self.prior, z, labels, self.rng)
        theta = random_directions(x.shape[1], self.n_projections, self.rng).to(x)
        loss = sliced_w2_sq(x, y, theta)
        return loss, {"swd2": float(loss.detach())}

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.weight, "swd_projections": self.n_projections}
