"""FLUX-style convolutional decoder (the LDM/FLUX autoencoder's decoder layout).

conv_in -> mid (res, single-head self-attention, res) -> per level, from the widest:
num_res_blocks + 1 ResNet blocks then 2x nearest upsampling + conv (all levels but the last)
-> GroupNorm, SiLU, conv_out. DMVAE's decoder: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, mid
attention, with one extra 2x upsampling at the input so that 16 x 16 latents decode to 256 px
(DMVAE_METHOD.md, "Recipe at paper scale").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.models import ResBlock
from tokenizers.registry import DECODERS


def group_norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in LDM/FLUX; fewer (the largest divisor of 32 that divides ch) for narrow
    # CPU widths, where 32 groups would not divide the channels.
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


def ResnetBlock(cin: int, cout: int) -> ResBlock:
    return ResBlock(cin, cout, norm=group_norm)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # [N, HW, C]
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(a.transpose(1, 2).reshape(n, c, h, w))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@DECODERS.register("flux")
class FluxDecoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 mid_attention: bool = True, upsample_input: bool = False) -> None:
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, top, 3, padding=1)
        self.up_in = Upsample(top) if upsample_input else nn.Identity()
        self.mid = nn.Sequential(ResnetBlock(top, top), AttnBlock(top) if mid_attention else nn.Identity(),
                                 ResnetBlock(top, top))
        levels: list[nn.Module] = []
        cin = top
        for i in reversed(range(len(ch_mult))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):  # LDM/FLUX decoders use one block more per level
                blocks.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
            if i > 0:
                blocks.append(Upsample(cin))
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)
        self.upsample = 2 ** (len(ch_mult) - 1) * (2 if upsample_input else 1)

    @classmethod
    def upsampling(cls, section: dict) -> int:
        """Output side / latent side, from the config alone."""
        return 2 ** (len(section.get("ch_mult", (1, 2, 4, 4))) - 1) * (2 if section.get("upsample_input") else 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN's adaptive weight is measured at (taming-transformers' convention)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.up_in(self.conv_in(z)))
        h = self.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
