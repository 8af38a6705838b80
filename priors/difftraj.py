"""Difftraj ("diffusion noise"): noisy latents of a plain tokenizer at one time t of the flow path.

Paper Table 1 "Difftraj": LDM latents noised to t = 0.5. Here the plain tokenizer is the grid's
kl baseline (``base_loss``; or ``none`` for no regulariser) with the same tokenizer preset and
seed, trained by its own ``tokenizer`` stage (shared with the kl cell when the sweep has one).
Its normalised latents z of ``n_images`` training images form the bank; a sample is
x_t = t z + (1 - t) eps with fresh noise (SiT convention, t = 1 is clean), i.e. a Gaussian
mixture centred on the scaled latents.

The latents come from that cell's ``latent_cache`` stage (the kl generator's training latents,
encoded once; benchmark/stages/latent_cache.py): ``n_images`` of its rows drawn with ``seed``,
un-flipped, so the reference never runs the encoder. Given a (tokenizer, LatentNorm) instead
(``ctx.inputs["base_tokenizer"]``: tests, notebooks), it encodes ``n_images`` images of the
dataset itself.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from priors.base import FitContext
from priors.features import BankPrior
from priors.registry import PRIORS

log = logging.getLogger(__name__)


@PRIORS.register("difftraj")
class DifftrajPrior(BankPrior):
    def __init__(self, latent_shape: Sequence[int], t: float = 0.5, n_images: int = 8192,
                 base_loss: dict[str, Any] | None = None, base_prior: dict[str, Any] | None = None,
                 classes: Sequence[int] | None = None, seed: int = 0, label: str | None = None) -> None:
        # base_loss and base_prior are read by the DAG (benchmark/dag.py), which builds the plain
        # tokenizer from them; they are parameters because build_prior passes the whole section.
        super().__init__(latent_shape, classes)
        if not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"difftraj t must be in [0, 1], got {t}")
        self.name = label or "difftraj"
        self.t, self.n_images, self.seed = float(t), int(n_images), int(seed)

    @classmethod
    def upstream(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The latents of the plain tokenizer whose noisy latents are the reference: the
        latent_cache stage of the cell with the same presets and seed and the base loss (kl) and
        prior, shared with the sweep's kl cell when it has one."""
        from benchmark.upstream import StageOf
        p = cfg["prior"]
        return {"base_latents": StageOf("latent_cache", {**cfg, "prior": p["base_prior"], "loss": p["base_loss"]})}

    def fit(self, ctx: FitContext) -> None:
        if (cache := ctx.inputs.get("base_latents")) is not None:
            z, labels = self._from_cache(cache)
            source = ctx.input_keys.get("base_latents", "given")
        elif (base := ctx.inputs.get("base_tokenizer")) is not None:
            from benchmark.data import subset
            from tokenizers import encode_all
            tok, lnorm = base
            images = subset(ctx.dataset, self.n_images, seed=self.seed)
            z, labels = lnorm.normalize(encode_all(tok, images)), images.labels
            source = ctx.input_keys.get("base_tokenizer", "given")
        else:
            raise ValueError("difftraj needs its base latents: ctx.inputs['base_latents'] = a LatentCache (the grid "
                             "gives the kl cell's latent_cache stage) or ctx.inputs['base_tokenizer'] = "
                             "(tokenizer, LatentNorm)")
        self._set_bank(z, labels)
        self.info = {"difftraj_t": self.t, "base_latents": source, "reference_bank_size": int(len(self.bank))}

    def _from_cache(self, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_images`` rows of the cache drawn with ``seed`` (benchmark.data.subset's recipe),
        normalised, image views only."""
        n = min(self.n_images, len(cache))
        if n < self.n_images:
            log.warning("difftraj: n_images=%d but the base latent cache holds %d (generator.train_images); "
                        "the bank has %d", self.n_images, len(cache), n)
        rows = torch.randperm(len(cache), generator=torch.Generator().manual_seed(self.seed))[:n].sort().values
        return cache.batch(rows), cache.labels[rows]

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        z = self.bank[self._index(n, generator, labels)]
        eps = torch.randn(z.shape, generator=generator)
        return self.t * z + (1.0 - self.t) * eps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "t": torch.tensor(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.t = float(state["t"])
