"""Small convolutional encoder/decoder for CPU presets, and the Tokenizer that joins them.

The layout follows the LDM/FLUX autoencoder family (ResNet blocks with GroupNorm + SiLU,
strided downsampling, nearest-neighbour upsampling) at a width that trains in minutes on two
CPU cores. The bottleneck is a 1x1-conv MLP down to C latent channels as in DMVAE's
1024 -> 2048 -> 32 MLP; a stochastic head (mean, logvar) serves the kl baseline.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tokenizers.registry import DECODERS, ENCODERS


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation ResNet block (norm, SiLU, conv) x 2 with a 1x1 skip when widths differ;
    ``norm`` builds the GroupNorm (the FLUX decoder passes its own group count)."""

    def __init__(self, cin: int, cout: int, norm=_norm) -> None:
        super().__init__()
        self.body = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


@ENCODERS.register("conv")
class ConvEncoder(nn.Module):
    """Downsamples by 2 ** (len(mult) - 1); returns features of width ``out_features``."""

    def __init__(self, in_channels: int = 1, ch: int = 32, mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, image_size: int | None = None) -> None:
        # image_size: build_tokenizer passes it to every encoder (a ViT sizes its position table
        # by it); a conv encoder works at any size.
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        cin = ch
        for i, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, ch * m))
                cin = ch * m
            if i < len(mult) - 1:
                layers.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))
        layers += [_norm(cin), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = cin
        self.downsample = 2 ** (len(mult) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def validate(cls, section: dict, image_size: int) -> None:
        """The image side must halve exactly once per extra ``mult`` level."""
        down = 2 ** (len(section.get("mult", (1, 2, 2))) - 1)
        if image_size % down:
            raise ValueError(f"image size {image_size} is not divisible by the conv encoder's downsampling "
                             f"factor {down} (tokenizer.encoder.mult={list(section.get('mult', (1, 2, 2)))})")


@DECODERS.register("conv")
class ConvDecoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int = 1, ch: int = 32,
                 mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1) -> None:
        super().__init__()
        cin = ch * mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, cin, 3, padding=1)]
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(cin, ch * m))
                cin = ch * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(cin, cin, 3, padding=1)]
        layers += [_norm(cin), nn.SiLU(), nn.Conv2d(cin, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.upsample = 2 ** (len(mult) - 1)

    @classmethod
    def upsampling(cls, section: dict) -> int:
        """Output side / latent side, from the config alone."""
        return 2 ** (len(section.get("mult", (1, 2, 2))) - 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN's adaptive weight is measured at (taming-transformers' convention)."""
        return self.net[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def bottleneck_mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """Per-position MLP (1x1 convs, SiLU) from encoder features to latent channels: DMVAE's
    1024 -> 2048 -> 32 bottleneck; also the frozen-backbone stage's projection."""
    return nn.Sequential(nn.Conv2d(cin, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, cout, 1))


class Tokenizer(nn.Module):
    """encode(x in [0,1]) -> z [N, C, h, w]; decode(z) -> x in roughly [0, 1]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_channels: int,
                 image_size: int, stochastic: bool = False, bottleneck_hidden: int = 0) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.stochastic = stochastic
        out = latent_channels * (2 if stochastic else 1)
        feat = encoder.out_features
        hidden = bottleneck_hidden or 2 * feat
        self.bottleneck = bottleneck_mlp(feat, hidden, out)
        self.latent_channels = latent_channels
        side = image_size // encoder.downsample
        if side * encoder.downsample != image_size:
            raise ValueError(f"image size {image_size} is not divisible by the encoder's "
                             f"downsampling factor {encoder.downsample}")
        up = getattr(decoder, "upsample", encoder.downsample)
        if up != encoder.downsample:
            raise ValueError(f"the decoder upsamples by {up} but the encoder downsamples by "
                             f"{encoder.downsample}: reconstructions would not be {image_size} px")
        self.latent_shape = (latent_channels, side, side)

    def posterior(self, x: torch.Tensor, freeze_encoder: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """freeze_encoder: no gradient into the encoder (DMVAE stage 1: only MLP + decoder learn)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
            feat = self.encoder(x * 2.0 - 1.0)
        h = self.bottleneck(feat)
        if not self.stochastic:
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the LDM clamp keeps exp() finite

    def encode(self, x: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.posterior(x)
        if sample and logvar is not None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            return mean + (0.5 * logvar).exp() * eps
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z) + 1.0) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@torch.no_grad()
def encode_all(tok: "Tokenizer", images, batch_size: int = 500, device: torch.device | None = None) -> torch.Tensor:
    """Latents of every image of an image set (anything with ``len`` and ``float_batch(idx)``,
    e.g. benchmark.data.ImageSet), in batches, on ``device``; returned on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images.float_batch(torch.arange(i, min(len(images), i + batch_size)))
        out.append(tok.encode(x.to(device or "cpu")).cpu())
    return torch.cat(out)


def latent_side(tok_cfg: dict, resolution: int) -> int:
    """Side of the latent grid from the preset alone (no model built): conv encoders halve the
    image per extra ``mult`` level, the ViT has one latent per patch, backbone encoders use
    ``latent_grid`` (which they pool or resize to)."""
    enc = tok_cfg["encoder"]
    if enc.get("latent_grid"):
        return int(enc["latent_grid"])
    if enc["name"] == "vit":
        return resolution // int(enc.get("patch_size", 4))
    return resolution // 2 ** (len(enc.get("mult", [1])) - 1)


def build_decoder(cfg: dict, latent_channels: int, out_channels: int) -> nn.Module:
    """A decoder from its preset section (``name`` + kwargs)."""
    d = dict(cfg)
    return DECODERS.get(d.pop("name"))(latent_channels=latent_channels, out_channels=out_channels, **d)


def build_tokenizer(cfg: dict, image_size: int, in_channels: int, stochastic: bool) -> Tokenizer:
    """Build from the tokenizer preset's ``encoder``/``decoder`` sections (``name`` + kwargs)."""
    enc_cfg = dict(cfg["encoder"])
    c = int(cfg["latent_channels"])
    # image_size lets transformer encoders size their position embedding; conv ones ignore it.
    encoder = ENCODERS.get(enc_cfg.pop("name"))(in_channels=in_channels, image_size=image_size, **enc_cfg)
    decoder = build_decoder(cfg["decoder"], c, in_channels)
    return Tokenizer(encoder, decoder, c, image_size, stochastic=stochastic,
                     bottleneck_hidden=int(cfg.get("bottleneck_hidden", 0)))
