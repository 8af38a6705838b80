"""A small masked autoencoder (MAE) that the suite trains itself: the offline SSL backbone.

No SSL weights (DINOv2, MAE, CLIP) can be downloaded on an offline machine, so the embedded
default needs an SSL feature extractor it can build from the dataset alone. This is MAE
(He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners") at CPU size: a ViT encoder
made of timm's transformer ``Block`` sees 25% of the patches; a narrower decoder reconstructs the
masked ones; the loss is the MSE on masked patches with per-patch normalised targets (the
paper's ``norm_pix_loss``). It is trained by the ``ssl_backbone`` stage and cached like any other
stage. Results label it ``offline-mae`` with the stage key, never as a pretrained model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones.base import BACKBONES, FeatureBackbone, MissingWeightsError, check_file


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [side*side, dim] (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"position table width must be divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                            torch.arange(side, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        ang = coord[:, None] * freqs[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    from timm.models.vision_transformer import Block
    return nn.Sequential(*[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])


class MAE(nn.Module):
    """Encoder + decoder; ``encode`` returns all patch tokens (no masking) for feature use."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 128,
                 depth: int = 4, num_heads: int = 4, decoder_dim: int = 64, decoder_depth: int = 1,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"offline-mae: img_size {img_size} not divisible by patch_size {patch_size}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.side = img_size // patch_size
        n = self.side ** 2
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos", sincos_2d(self.side, embed_dim)[None], persistent=False)
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.dec_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("dec_pos", sincos_2d(self.side, decoder_dim)[None], persistent=False)
        self.dec_blocks = _blocks(decoder_dim, decoder_depth, decoder_heads, mlp_ratio)
        self.dec_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.dec_pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self.num_patches = n
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """All patch tokens [N, L, D] after the encoder (class token dropped)."""
        t = self._tokens(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.norm(self.blocks(t))[:, 1:]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.patch_size, self.side
        x = x.reshape(x.shape[0], self.in_chans, s, p, s, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(x.shape[0], s * s, p * p * self.in_chans)

    def loss(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error on the masked patches of ``x`` [n, C, H, W].

        The mask keeps, per image, the ``round(L * (1 - mask_ratio))`` patches of lowest
        ``noise`` [n, L]: drawn here as ``torch.rand(n, L, generator=generator)`` when None. A
        data-parallel caller draws that tensor for the whole global batch itself (in the order
        one process draws it) and passes its rows of this process's slice, so N processes mask
        exactly the patches one process masks. The loss is a mean over n * (L - keep) patches,
        a count the same for every equal slice: the mean of the slices' losses is the global
        batch's."""
        n, L = x.shape[0], self.num_patches
        keep = max(1, int(round(L * (1 - mask_ratio))))
        if noise is None:
            noise = torch.rand(n, L, generator=generator)
        elif noise.shape != (n, L):
            raise ValueError(f"MAE.loss: noise of shape {tuple(noise.shape)} for {n} images of {L} patches")
        noise = noise.to(x.device)
        order = noise.argsort(dim=1)            # random permutation per image
        kept = order[:, :keep]
        t = self._tokens(x)
        t = torch.gather(t, 1, kept[..., None].expand(-1, -1, t.shape[-1]))
        t = torch.cat([self.cls_token.expand(n, -1, -1), t], dim=1)
        h = self.dec_embed(self.norm(self.blocks(t)))[:, 1:]
        # Scatter the visible tokens back among mask tokens, in patch order.
        full = self.mask_token.expand(n, L, -1).clone()
        full = full.to(h.dtype)
        full.scatter_(1, kept[..., None].expand(-1, -1, h.shape[-1]), h)
        pred = self.dec_pred(self.dec_norm(self.dec_blocks(full + self.dec_pos)))
        target = self.patchify(x)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mu) / (var + 1e-6).sqrt()
        masked = torch.ones(n, L, device=x.device)
        masked.scatter_(1, kept, 0.0)
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * masked).sum() / masked.sum()


# Inputs are scaled to [-1, 1] per channel (the images are grey: no ImageNet statistics apply).
MAE_MEAN, MAE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@BACKBONES.register("offline-mae")
class OfflineMAEBackbone(FeatureBackbone):
    """The trained MAE's encoder; ``checkpoint`` is the ssl_backbone stage's ``backbone.pt``."""

    # The roles of the stages this backbone needs; their outputs are constructor overrides
    # (the ssl_backbone stage's: {"checkpoint": <its backbone.pt>}).
    input_roles = ("ssl_backbone",)

    @classmethod
    def upstream(cls, cfg: dict[str, Any], backbone: dict[str, Any]) -> dict[str, Any]:
        """The suite trains this backbone itself: the ``ssl_backbone`` stage, keyed by the
        dataset and the backbone's architecture and training settings (so every cell and seed
        that uses the same backbone shares one trained model, as they would a downloaded one)."""
        from benchmark.upstream import Need, data_slice
        params = {"data": data_slice(cfg), "backbone": {k: v for k, v in backbone.items() if k != "checkpoint"}}
        return {"ssl_backbone": Need("ssl_backbone", params)}

    @classmethod
    def preflight(cls, cfg: dict[str, Any], what: str) -> None:
        """Nothing to check before the run: the ssl_backbone stage makes its weights."""

    def __init__(self, checkpoint: str | None = None, pretrained: bool = True, img_size: int = 32,
                 arch: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> None:
        # train: the ssl_backbone stage's settings (it reads them); taken here because
        # build_backbone passes the whole backbone section.
        super().__init__(img_size, MAE_MEAN, MAE_STD)
        self.mae = MAE(img_size=img_size, **(arch or {}))
        if checkpoint:
            path = check_file(checkpoint, "offline-mae backbone",
                              "It is written by the ssl_backbone stage; run the grid (it trains it first).")
            self.mae.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.weights_source = f"offline-mae:{path.parent.name}"
        elif pretrained:
            raise MissingWeightsError("offline-mae backbone: no checkpoint given. Its weights come from the "
                                      "ssl_backbone stage, which the grid runs before the reference stage; "
                                      "pass checkpoint=<run dir>/backbone.pt or pretrained=false for random weights")
        else:
            self.weights_source = "random"
        self.out_dim = self.mae.norm.normalized_shape[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.mae.encode(x)
        s = self.mae.side
        return tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], s, s)


def mae_flops_per_image(mae: MAE, mask_ratio: float) -> float:
    """Approximate training FLOPs per image (forward + backward = 3x forward matmuls)."""
    def block_flops(tokens: int, dim: int, depth: int) -> float:
        return depth * tokens * (24 * dim * dim + 4 * tokens * dim)  # qkv/proj/mlp(4x) + attention
    enc_dim = mae.norm.normalized_shape[0]
    dec_dim = mae.dec_norm.normalized_shape[0]
    keep = max(1, int(round(mae.num_patches * (1 - mask_ratio)))) + 1
    f = block_flops(keep, enc_dim, len(mae.blocks)) + block_flops(mae.num_patches, dec_dim, len(mae.dec_blocks))
    return 3.0 * f
