"""Adversarial latent matching: the adversarial autoencoder's regulariser (Makhzani et al. 2016).

A small MLP discriminator over flattened latents learns, in ``update``, to tell samples of p_ref
(label 1) from the encoder's detached latents (label 0) with the logistic loss. ``forward`` gives
the encoder the non-saturating generator loss -log sigmoid(D(z)) (Goodfellow et al. 2014,
Sec. 3), which is log 2 at the equilibrium D = 1/2. The discriminator's parameters are used
detached in ``forward`` so that the tokenizer's backward leaves no gradient on them; only
``update`` trains them, with the discriminator's own Adam (saved through ``extra_state``).
An optional R1 penalty (gamma / 2) E_p ||grad D||^2 on the prior samples (Mescheder et al. 2018)
keeps the discriminator from growing sharp when the two sets separate.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from priors.losses.base import MatchingLoss
from priors.losses.mmd import prior_batch, require_sampler
from priors.registry import LOSSES


def build_discriminator(in_dim: int, hidden: int, depth: int) -> nn.Sequential:
    """MLP in_dim -> hidden (x depth) -> 1 logit; LeakyReLU(0.2) as in DCGAN's discriminator."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@LOSSES.register("adversarial")
class AdversarialMatching(MatchingLoss):
    tokenizer_every = 1  # discriminator and encoder alternate every step, as in the AAE

    def __init__(self, weight: float = 1.0, *, latent_shape: tuple[int, ...], prior: Any = None,
                 hidden: int = 256, depth: int = 2, lr: float = 2e-4,
                 betas: tuple[float, float] = (0.5, 0.999), r1_gamma: float = 0.0,
                 seed: int = 0, num_classes: int | None = None) -> None:
        # num_classes: passed by the runner to every loss; the discriminator is unconditional.
        super().__init__(weight)
        require_sampler(prior, "adversarial")
        if hidden < 1 or depth < 1:
            raise ValueError(f"adversarial hidden and depth must be >= 1, got {hidden} and {depth}")
        if r1_gamma < 0:
            raise ValueError(f"adversarial r1_gamma must be >= 0, got {r1_gamma}")
        object.__setattr__(self, "prior", prior)  # not a submodule: its state is the prior's
        self.hidden, self.depth, self.r1_gamma = int(hidden), int(depth), float(r1_gamma)
        self.disc = build_discriminator(math.prod(latent_shape), self.hidden, self.depth)
        self.disc_opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=tuple(betas))
        self.rng = torch.Generator().manual_seed(int(seed))

    def forward(self, z, labels, step, posterior=None):
        frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
        logits = functional_call(self.disc, frozen, (z.reshape(z.shape[0], -1),))
        loss = F.softplus(-logits).mean()  # = -log sigmoid(D(z)), the non-saturating loss
        return loss, {"adv_g": float(loss.detach()),
                      "adv_p_prior": float(torch.sigmoid(logits.detach()).mean())}

    def update(self, z: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        """One logistic-regression step of the discriminator: prior samples 1, latents 0."""
        self.disc.train()
        fake = z.detach().reshape(z.shape[0], -1)
        real = prior_batch(self.prior, fake, labels, self.rng).requires_grad_(self.r1_gamma > 0)
        d_real, d_fake = self.disc(real), self.disc(fake)
        loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        logs = {"adv_d": float(loss.detach())}
        if self.r1_gamma > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            r1 = grad.pow(2).sum(1).mean()
            loss = loss + 0.5 * self.r1_gamma * r1
            logs["adv_r1"] = float(r1.detach())
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        with torch.no_grad():
            acc = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean())
        logs["adv_d_acc"] = float(acc)
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"disc_opt": self.disc_opt.state_dict(), "rng": self.rng.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.disc_opt.load_state_dict(state["disc_opt"])
        self.rng.set_state(state["rng"])

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.weight, "adv_hidden": self.hidden, "adv_depth": self.depth,
                "adv_r1_gamma": self.r1_gamma}
