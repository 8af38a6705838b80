"""Difftraj ("diffusion noise"): noisy latents of a plain tokenizer at one time t of the flow path.

Paper Table 1 "Difftraj": LDM latents noised to t = 0.5. Here the plain tokenizer is the grid's
kl baseline (``base_loss``; or ``none`` for no regulariser) with the same tokenizer preset and
seed, trained by its own ``tokenizer`` stage (shared with the kl cell when the sweep has one).
Its normalised latents z of ``n_images`` training images form the bank; a sample is
x_t = t z + (1 - t) eps with fresh noise (SiT convention, t = 1 is clean), i.e. a Gaussian
mixture centred on the scaled latents.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from priors.base import FitContext
from priors.features import BankPrior
from priors.registry import PRIORS


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
        """The plain tokenizer whose noisy latents are the reference: the tokenizer stage of the
        cell with the same presets and seed and the base loss (kl) and prior, shared with the
        sweep's kl cell when it has one."""
        from benchmark.upstream import StageOf
        p = cfg["prior"]
        return {"base_tokenizer": StageOf("tokenizer", {**cfg, "prior": p["base_prior"], "loss": p["base_loss"]})}

    def fit(self, ctx: FitContext) -> None:
        from benchmark.data import subset
        from tokenizers import encode_all
        base = ctx.inputs.get("base_tokenizer")
        if base is None:
            raise ValueError("difftraj needs its base tokenizer: ctx.inputs['base_tokenizer'] = "
                             "(tokenizer, LatentNorm), which the grid loads from the kl tokenizer stage")
        tok, lnorm = base
        images = subset(ctx.dataset, self.n_images, seed=self.seed)
        z = lnorm.normalize(encode_all(tok, images))
        self._set_bank(z, images.labels)
        self.info = {"difftraj_t": self.t, "base_tokenizer": ctx.input_keys.get("base_tokenizer", "given"),
                     "reference_bank_size": int(len(self.bank))}

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
