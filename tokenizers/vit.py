"""Transformer encoders: a small ViT for CPU presets and a wrapper around pretrained backbones.

Both return a feature grid [N, out_features, h, w] like ConvEncoder, so the same bottleneck MLP
(1x1 convs, DMVAE's 1024 -> 2048 -> 32) follows every encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.registry import ENCODERS


@ENCODERS.register("vit")
class ViTEncoder(nn.Module):
    """Patch-embedding conv, learned position embedding, timm ``Block``s, final LayerNorm.

    A CPU-sized stand-in for the paper's DINOv2 ViT-L with the same token layout: one latent per
    patch, so ``downsample`` is the patch size (the paper runs DINOv2 with patch 16 -> 16 x 16
    tokens at 256 px). No class token: the tokenizer only uses the patch tokens.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block
        if image_size % patch_size:
            raise ValueError(f"vit encoder: image size {image_size} is not divisible by patch_size {patch_size}")
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # timm VisionTransformer's init
        # qkv_bias=True as in timm's ViT presets (and DINOv2).
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_features = dim
        self.downsample = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)                      # [N, D, g, g]
        n, d, gh, gw = h.shape
        h = h.flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h).transpose(1, 2).reshape(n, d, gh, gw)


@ENCODERS.register("backbone")
class BackboneEncoder(nn.Module):
    """A pretrained feature backbone from the ``backbones`` package (DINOv2, MAE, ResNet, CLIP).

    ``backbone`` is the backbones package's config dict; ``latent_grid`` (optional) is the side of
    the latent grid: when the backbone's own grid differs, its features are adaptive-average-pooled
    (downsampling) or bilinearly resized (upsampling) to it. ``freeze: true`` keeps the backbone's
    weights fixed for the whole run (the DMVAE stage-1 setting, where only the bottleneck MLP and
    the decoder learn); the stage's ``warmup_frozen_encoder`` freezes it only during warm-up.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 256, backbone: dict | None = None,
                 latent_grid: int | None = None, freeze: bool = False, norm_eval: bool = False) -> None:
        super().__init__()
        if not backbone:
            raise ValueError("encoder 'backbone' needs a `backbone:` section, e.g. "
                             "{name: timm, model: vit_large_patch14_dinov2.lvd142m, patch_size: 16}")
        try:
            from backbones import build_backbone
        except ImportError as exc:
            raise ImportError(f"encoder 'backbone' needs the project's `backbones` package: {exc}") from exc
        self.bb = build_backbone(dict(backbone))
        self.out_features = int(self.bb.out_dim)
        self.weights_source = str(getattr(self.bb, "weights_source", "unknown"))
        self.freeze = bool(freeze)
        # norm_eval: batch norms keep the statistics the backbone was trained (or stage 1 ran)
        # with while the weights train; batch statistics of small batches would move every
        # feature at the first step (the usual practice when fine-tuning a CNN backbone).
        self.norm_eval = bool(norm_eval)
        if self.freeze:
            self.bb.requires_grad_(False)
        if latent_grid is None:
            # One probe forward tells the backbone's native grid (it resizes inputs itself).
            with torch.no_grad():
                latent_grid = int(self.bb(torch.zeros(1, in_channels, image_size, image_size)).shape[-1])
        self.grid = int(latent_grid)
        if self.grid < 1 or image_size % self.grid:
            raise ValueError(f"encoder 'backbone': latent_grid {self.grid} must divide the image size {image_size}")
        self.downsample = image_size // self.grid

    def train(self, mode: bool = True) -> "BackboneEncoder":
        super().train(mode)
        if self.freeze:
            self.bb.eval()  # a frozen backbone keeps its inference behaviour (dropout, norms)
        elif self.norm_eval and mode:
            for m in self.bb.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The Tokenizer feeds encoders images in [-1, 1]; backbones take [0, 1] and normalise
        # with their own statistics.
        f = self.bb((x + 1.0) * 0.5)
        if f.shape[-1] == self.grid and f.shape[-2] == self.grid:
            return f
        if f.shape[-1] > self.grid:
            return F.adaptive_avg_pool2d(f, self.grid)
        return F.interpolate(f, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
