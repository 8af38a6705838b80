"""Pointwise alignment to a frozen foundation model's features: VA-VAE's VF loss.

Yao et al. 2025 ("Reconstruction vs. Generation", arXiv 2501.01423, Sec. 3.2) project the latent
Z [C, H, W] by a learnable linear map (here a 1x1 conv) to the feature width D, giving Z', and
compare it with the foundation features F [D, H, W] by two margin terms:

    L_mcos = 1/(HW) sum_ij relu(1 - m1 - cos(z'_ij, f_ij))
    L_mdms = 1/N^2  sum_ij relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2),   N = HW,

averaged over the batch. The margins (m1 = 0.5, m2 = 0.25 in VA-VAE) stop pulling once a
position (or a pair of positions) is similar enough, so the latent keeps room for detail.
VA-VAE weights the sum by 0.1 times an adaptive ratio of reconstruction to VF gradient norms at
the encoder's last layer; the trainer here passes a fixed lambda instead (``weight``), because a
matching loss never sees the reconstruction graph.

Unlike the other matching losses this one is per image: it needs the features *of the images
being encoded*. The trainer passes no images, so the contract is that the prior supplies them
through ``align_targets(labels, n) -> Tensor[n, D, H, W]`` (a feature prior), or the caller
passes ``target_features=`` to ``forward``/``update``. The projection is part of the loss:
``forward`` uses it detached (the encoder's gradient passes through it), ``update`` fits it on
the detached latents with its own AdamW, i.e. VA-VAE's joint training done alternately.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from priors.losses.base import MatchingLoss
from priors.registry import LOSSES


def cosine_margin_loss(zp: torch.Tensor, feats: torch.Tensor, margin: float) -> torch.Tensor:
    """L_mcos on [n, D, H, W] pairs: positions with cos >= 1 - margin contribute nothing."""
    cos = F.cosine_similarity(zp, feats, dim=1, eps=1e-8)       # [n, H, W]
    return F.relu(1.0 - margin - cos).mean()


def _self_cosines(x: torch.Tensor) -> torch.Tensor:
    u = F.normalize(x.flatten(2), dim=1, eps=1e-8)             # [n, D, N]
    return u.transpose(1, 2) @ u                                # [n, N, N]


def distance_matrix_margin_loss(zp: torch.Tensor, feats: torch.Tensor, margin: float) -> torch.Tensor:
    """L_mdms: the within-image cosine-similarity matrices must agree up to the margin."""
    diff = (_self_cosines(zp) - _self_cosines(feats)).abs()
    return F.relu(diff - margin).mean()


@LOSSES.register("align")
class FoundationAlignment(MatchingLoss):
    def __init__(self, weight: float = 0.1, *, latent_shape: tuple[int, ...], prior: Any = None,
                 feature_dim: int | None = None, cos_margin: float = 0.5,
                 distmat_margin: float = 0.25, cos_weight: float = 1.0, distmat_weight: float = 1.0,
                 proj_lr: float = 1e-3, proj_betas: tuple[float, float] = (0.9, 0.95),
                 num_classes: int | None = None) -> None:
        # num_classes: passed by the runner to every loss; the targets come per image instead.
        super().__init__(weight)
        if not callable(getattr(prior, "align_targets", None)):
            raise ValueError(
                f"the align loss needs per-image foundation features, but prior "
                f"{getattr(prior, 'name', type(prior).__name__)!r} has no align_targets(labels, n) "
                f"-> Tensor[n, D, H, W] method; use a feature prior that exposes it (or pass "
                f"target_features= to forward/update when calling the loss directly)")
        dim = feature_dim if feature_dim is not None else getattr(prior, "align_dim", None)
        if dim is None or int(dim) < 1:
            raise ValueError("the align loss needs the feature width D: set loss.feature_dim or "
                             "give the prior an `align_dim` attribute")
        if len(latent_shape) != 3:
            raise ValueError(f"the align loss needs spatial latents (C, H, W), got {latent_shape}")
        if not (0 <= cos_margin <= 2 and 0 <= distmat_margin <= 2):
            raise ValueError(f"align margins must lie in [0, 2] (cosines span [-1, 1]), got "
                             f"cos_margin={cos_margin}, distmat_margin={distmat_margin}")
        object.__setattr__(self, "prior", prior)  # not a submodule: its state is the prior's
        self.feature_dim = int(dim)
        self.cos_margin, self.distmat_margin = float(cos_margin), float(distmat_margin)
        self.cos_weight, self.distmat_weight = float(cos_weight), float(distmat_weight)
        self.proj = nn.Conv2d(int(latent_shape[0]), self.feature_dim, kernel_size=1)
        self.proj_opt = torch.optim.AdamW(self.proj.parameters(), lr=proj_lr, betas=tuple(proj_betas))
        self._last_targets: torch.Tensor | None = None  # forward's targets, reused by update

    def _targets(self, z: torch.Tensor, labels: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        f = given if given is not None else self.prior.align_targets(labels, z.shape[0])
        if f.dim() != 4 or f.shape[0] != z.shape[0] or f.shape[1] != self.feature_dim:
            raise ValueError(f"align targets must be [n={z.shape[0]}, D={self.feature_dim}, H, W], "
                             f"got {tuple(f.shape)}")
        return f.detach().to(device=z.device, dtype=z.dtype)

    def vf_terms(self, zp: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if zp.shape[-2:] != feats.shape[-2:]:
            # Different grids (e.g. 8x8 latents vs 16x16 ViT tokens): compare on the feature grid.
            zp = F.interpolate(zp, size=feats.shape[-2:], mode="bilinear", align_corners=False)
        return (cosine_margin_loss(zp, feats, self.cos_margin),
                distance_matrix_margin_loss(zp, feats, self.distmat_margin))

    def forward(self, z, labels, step, posterior=None, target_features: torch.Tensor | None = None):
        feats = self._targets(z, labels, target_features)
        frozen = {k: v.detach() for k, v in self.proj.named_parameters()}
        mcos, mdms = self.vf_terms(functional_call(self.proj, frozen, (z,)), feats)
        loss = self.cos_weight * mcos + self.distmat_weight * mdms
        self._last_targets = feats
        return loss, {"align_mcos": float(mcos.detach()), "align_mdms": float(mdms.detach())}

    def update(self, z: torch.Tensor, labels: torch.Tensor, step: int,
               target_features: torch.Tensor | None = None) -> dict[str, float]:
        """One step of the projection on the detached latents (same loss as forward)."""
        cached = self._last_targets
        if target_features is None and cached is not None and cached.shape[0] == z.shape[0]:
            target_features = cached
        self._last_targets = None
        feats = self._targets(z, labels, target_features)
        mcos, mdms = self.vf_terms(self.proj(z.detach()), feats)
        loss = self.cos_weight * mcos + self.distmat_weight * mdms
        self.proj_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.proj_opt.step()
        return {"align_proj": float(loss.detach())}

    def extra_state(self) -> dict[str, Any]:
        return {"proj_opt": self.proj_opt.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.proj_opt.load_state_dict(state["proj_opt"])

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.weight, "align_feature_dim": self.feature_dim,
                "align_cos_margin": self.cos_margin, "align_distmat_margin": self.distmat_margin}
