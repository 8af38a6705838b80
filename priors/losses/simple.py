"""The baselines: a plain autoencoder (``none``) and the VAE posterior KL (``kl``)."""
from __future__ import annotations

from typing import Any


from priors.losses.base import MatchingLoss
from priors.registry import LOSSES


@LOSSES.register("none")
class NoMatching(MatchingLoss):
    """No regulariser: the latent distribution is whatever reconstruction makes it."""

    def __init__(self, weight: float = 0.0, *, latent_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, prior: Any = None) -> None:
        # The runner passes latent_shape, num_classes and prior to every loss; none is used here.
        super().__init__(weight)

    def forward(self, z, labels, step, posterior=None):
        return z.new_zeros(()), {}


@LOSSES.register("kl")
class KLToStandardNormal(MatchingLoss):
    """KL(N(mu, sigma^2) || N(0, I)) of a diagonal-Gaussian encoder (the paper's VAE baseline).

    Averaged over latent elements and the batch, like the reconstruction terms (means over
    pixels). LDM instead sums both over elements: rec_sum + 1e-6 * kl_sum, which divided by the
    P pixel elements is rec_mean + 1e-6 * (L / P) * kl_mean for L latent elements. LDM's strength
    is therefore lambda = 1e-6 * L / P here, a *smaller* number: 2.5e-7 for 4 x 8 x 8 latents of
    32 x 32 grey images (L / P = 1/4), so the 1e-3 of the CPU presets regularises about 4,000
    times more strongly than LDM's KL-f8 (grid=mini-paper runs both).
    """
    needs_posterior = True

    def __init__(self, weight: float = 1e-3, *, latent_shape: tuple[int, ...] | None = None,
                 num_classes: int | None = None, prior: Any = None) -> None:
        # The runner passes latent_shape, num_classes and prior to every loss; the KL is to N(0, I).
        super().__init__(weight)

    def forward(self, z, labels, step, posterior=None):
        if posterior is None:
            raise ValueError("the kl loss needs the encoder posterior (mean, logvar): build the "
                             "tokenizer with a stochastic head (done automatically for loss=kl)")
        mean, logvar = posterior
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.mean(), {"kl": float(kl.mean().detach())}
