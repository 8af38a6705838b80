"""Text prior: text embeddings of per-class captions, shaped to the latent grid.

Paper Table 1 "Text" used SigLIP embeddings of captions. Captions here are prompt templates
filled with the dataset's class names ("a photo of a {}." ...), embedded by a text tower
(``backbones.text``, CLIP through open_clip). How they become latents, our choice:
- each unit embedding e (D values) is mapped to the C*H*W latent values by one fixed, seeded
  random matrix with orthonormal rows or columns (a norm-preserving embedding of the text space,
  so cosine structure between captions is kept exactly);
- the projected means are centred and scaled so that the mixture below has unit variance per
  latent value, like the Gaussian prior;
- p_ref is an equal-weight Gaussian mixture with one isotropic component of std ``component_std``
  per caption, conditioned on the class through its captions. It therefore has an exact score
  (the GMM formula of priors/analytic.py), and the dm loss uses it unless told otherwise.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from priors.analytic import GMMPrior
from priors.base import FitContext
from priors.registry import PRIORS

# A few of CLIP's ImageNet prompt templates (Radford et al., 2021), enough for within-class spread.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.",
                     "a black and white photo of a {}.", "a low resolution photo of a {}.",
                     "a photo of a small {}.", "a photo of a large {}.", "a close-up photo of a {}.")


@PRIORS.register("text")
class TextPrior(GMMPrior):
    class_conditional = True

    def __init__(self, latent_shape: Sequence[int], text_encoder: dict[str, Any] | None = None,
                 class_names: Sequence[str] | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 component_std: float = 0.5, seed: int = 0, label: str | None = None) -> None:
        super().__init__(latent_shape, num_components=1, component_std=component_std, seed=seed)
        self.name = label or "text"
        self.text_cfg = dict(text_encoder or {"name": "open_clip", "model": "ViT-B-16", "pretrained": "openai"})
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates)
        self.seed = int(seed)
        self.comp_labels = torch.zeros(1, dtype=torch.long)
        self.info: dict[str, Any] = {}

    @classmethod
    def validate(cls, cfg: dict[str, Any]) -> None:
        """The text tower's weights must be loadable before any stage runs."""
        from backbones import preflight
        preflight(cfg["prior"].get("text_encoder"), "prior.text_encoder")

    def fit(self, ctx: FitContext) -> None:
        from backbones.text import build_text_encoder
        names = self.class_names or list(getattr(ctx.dataset, "class_names", []) or [])
        if not names:
            raise ValueError("text prior needs class names (from the dataset or prior.class_names)")
        enc = build_text_encoder(self.text_cfg)
        captions = [t.format(n) for n in names for t in self.templates]
        emb = enc.encode(captions).double()                              # [K, D], unit norm
        self.set_embeddings(emb, torch.arange(len(names)).repeat_interleave(len(self.templates)))
        self.info = {"text_encoder": self.text_cfg.get("model", self.text_cfg["name"]),
                     "text_weights": enc.weights_source, "captions": len(captions)}

    def set_embeddings(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        dim = math.prod(self.latent_shape)
        g = torch.Generator().manual_seed(self.seed + 5)
        q, _ = torch.linalg.qr(torch.randn(max(dim, emb.shape[1]), min(dim, emb.shape[1]),
                                           generator=g, dtype=torch.float64))
        means = emb @ q.T if dim >= emb.shape[1] else emb @ q         # [K, dim]
        means = means - means.mean(0, keepdim=True)
        # Mixture variance per value = s^2 + mean square of the centred means -> set it to 1.
        ms = float((means ** 2).mean())
        means = means * math.sqrt((1 - self.s ** 2) / max(ms, 1e-12))
        self.means = means.float()
        self.k = len(means)
        self.comp_labels = labels.long()

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().sample(n, generator)
        comp = torch.empty(n, dtype=torch.long)
        u = torch.rand(n, generator=generator)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            pool = (self.comp_labels == c).nonzero().flatten()
            if len(pool) == 0:
                pool = torch.arange(self.k)
            comp[rows] = pool[(u[rows] * len(pool)).long().clamp_max(len(pool) - 1)]
        z = self.means[comp] + self.s * torch.randn(n, self.means.shape[1], generator=generator)
        return z.reshape(n, *self.latent_shape)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "comp_labels": self.comp_labels.clone(), "info": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means = state["means"].clone()
        self.k = len(self.means)
        self.s = float(state["component_std"])
        self.comp_labels = state["comp_labels"].long()
        self.info = dict(state.get("info", {}))

    def describe(self) -> dict[str, Any]:
        return dict(self.info)
