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

    Averaged over latent elements and the batch, so that lambda is comparable across latent
    sizes (LDM sums over elements instead; their 1e-6 corresponds to a larger lambda here).
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
