"""Encoders and decoders of the tokenizer: the small ViT, the FLUX decoder, the backbone wrapper."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from tokenizers import DECODERS, ENCODERS, build_tokenizer
from tokenizers.flux import FluxDecoder


def test_vit_encoder_grid_and_contract():
    enc = ENCODERS.get("vit")(in_channels=1, image_size=32, patch_size=4, dim=32, depth=2, num_heads=2)
    assert (enc.out_features, enc.downsample) == (32, 4)
    f = enc(torch.rand(3, 1, 32, 32))
    assert f.shape == (3, 32, 8, 8)
    f.sum().backward()
    assert enc.pos_embed.grad is not None and enc.patch_embed.weight.grad is not None
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ENCODERS.get("vit")(image_size=30, patch_size=4)


def test_vit_tokens_see_each_other():
    """Attention mixes positions: changing one patch changes the features of another."""
    torch.manual_seed(0)
    enc = ENCODERS.get("vit")(in_channels=1, image_size=16, patch_size=4, dim=16, depth=1, num_heads=2).eval()
    x = torch.rand(1, 1, 16, 16)
    x2 = x.clone(); x2[..., :4, :4] += 1
    a, b = enc(x), enc(x2)
    assert not torch.allclose(a[..., 3, 3], b[..., 3, 3])


@pytest.mark.parametrize("ch,mult,up_in", [(8, (1, 2, 2), False), (16, (1, 2), True)])
def test_flux_decoder_shapes(ch, mult, up_in):
    dec = DECODERS.get("flux")(latent_channels=4, out_channels=3, ch=ch, ch_mult=mult,
                               num_res_blocks=1, upsample_input=up_in)
    up = 2 ** (len(mult) - 1) * (2 if up_in else 1)
    assert dec.upsample == up
    out = dec(torch.randn(2, 4, 4, 4))
    assert out.shape == (2, 3, 4 * up, 4 * up)
    assert dec.last_layer is dec.conv_out.weight


def test_flux_paper_preset_layout():
    dec = FluxDecoder(latent_channels=32, out_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                      upsample_input=True)
    assert dec.upsample == 16  # 16 x 16 latents -> 256 px
    assert [len(level) for level in dec.up] == [4, 4, 4, 3]  # 3 res blocks (+ upsample) per level
    assert all(m.num_groups == 32 for m in dec.modules() if isinstance(m, nn.GroupNorm))
    n = sum(p.numel() for p in dec.parameters())
    assert 40e6 < n < 60e6, n  # the LDM/FLUX decoder at ch 128 has ~49M parameters


def test_tokenizer_with_vit_and_flux_round_trip():
    cfg = {"encoder": {"name": "vit", "patch_size": 4, "dim": 16, "depth": 1, "num_heads": 2},
           "decoder": {"name": "flux", "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1},
           "latent_channels": 4}
    tok = build_tokenizer(cfg, 32, 1, stochastic=False)
    x = torch.rand(2, 1, 32, 32)
    assert tok.encode(x).shape == (2, 4, 8, 8) and tok(x).shape == x.shape
    state = tok.state_dict()
    tok2 = build_tokenizer(cfg, 32, 1, stochastic=False)
    tok2.load_state_dict(state)
    torch.testing.assert_close(tok2(x), tok(x))
    bad = {**cfg, "decoder": {**cfg["decoder"], "ch_mult": [1, 2]}}
    with pytest.raises(ValueError, match="upsamples by 2 but the encoder downsamples by 4"):
        build_tokenizer(bad, 32, 1, stochastic=False)


def test_frozen_encoder_gets_no_gradient():
    cfg = {"encoder": {"name": "conv", "ch": 8}, "decoder": {"name": "conv", "ch": 8}, "latent_channels": 4}
    tok = build_tokenizer(cfg, 16, 1, stochastic=False)
    mean, _ = tok.posterior(torch.rand(2, 1, 16, 16), freeze_encoder=True)
    tok.decode(mean).sum().backward()
    assert all(p.grad is None for p in tok.encoder.parameters())
    assert all(p.grad is not None for p in tok.bottleneck.parameters())


class _FakeBackbone(nn.Module):
    """Stands in for backbones.build_backbone: patch-14 grid of a resized [0, 1] image."""

    def __init__(self, cfg, in_channels):
        super().__init__()
        self.cfg, self.out_dim, self.weights_source = cfg, 12, "test"
        self.proj = nn.Conv2d(3, 12, 14, stride=14)
        self.seen: list[tuple[float, float]] = []

    def forward(self, x):
        self.seen.append((float(x.min()), float(x.max())))
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return self.proj(nn.functional.interpolate(x, size=(self.cfg["input_size"],) * 2))


@pytest.fixture
def fake_backbones(monkeypatch):
    mod = types.ModuleType("backbones")
    mod.build_backbone = _FakeBackbone
    monkeypatch.setitem(sys.modules, "backbones", mod)


def test_backbone_encoder_pools_to_the_latent_grid_and_freezes(fake_backbones):
    enc = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone={"input_size": 112},
                                   latent_grid=4, freeze=True)
    assert (enc.out_features, enc.downsample, enc.grid) == (12, 8, 4)  # native grid 8 -> pooled to 4
    enc.train()
    assert enc.training and not enc.bb.training
    x = torch.rand(2, 1, 32, 32) * 2 - 1     # the Tokenizer feeds encoders [-1, 1]
    f = enc(x)
    assert f.shape == (2, 12, 4, 4)
    lo, hi = enc.bb.seen[-1]
    assert lo >= 0.0 and hi <= 1.0          # the backbone gets [0, 1]
    assert not any(p.requires_grad for p in enc.parameters())
    probed = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone={"input_size": 56})
    assert (probed.grid, probed.downsample) == (4, 8)   # native grid found by a probe forward
    up = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone={"input_size": 28}, latent_grid=4)
    assert up(x).shape == (2, 12, 4, 4)      # native 2 -> interpolated up to 4
    with pytest.raises(ValueError, match="must divide"):
        ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone={"input_size": 56}, latent_grid=5)
