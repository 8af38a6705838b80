"""Encoders and decoders of the tokenizer: the small ViT, the FLUX decoder, the backbone wrapper."""
from __future__ import annotations


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


MOBILENET = {"name": "mobilenet_v2", "pretrained": True, "layer": 14, "input_size": 128}  # offline weights


def test_backbone_encoder_pools_to_the_latent_grid_and_freezes(one_thread):
    """The real backbones package: ImageNet MobileNetV2 (stride 16 at 128 px -> grid 8)."""
    enc = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone=MOBILENET, latent_grid=4, freeze=True)
    assert (enc.out_features, enc.downsample, enc.grid) == (96, 8, 4)  # native grid 8 -> pooled to 4
    assert "IMAGENET1K_V1" in enc.weights_source
    enc.train()
    assert enc.training and not enc.bb.training    # frozen BatchNorm keeps its running statistics
    x = torch.rand(2, 1, 32, 32) * 2 - 1     # the Tokenizer feeds encoders [-1, 1]
    f = enc(x)
    assert f.shape == (2, 96, 4, 4)
    # The backbone gets [0, 1] images: the same features as calling it directly and pooling.
    with torch.no_grad():
        ref = nn.functional.adaptive_avg_pool2d(enc.bb((x + 1) * 0.5), 4)
    torch.testing.assert_close(f, ref)
    assert not any(p.requires_grad for p in enc.parameters())
    probed = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone=MOBILENET)
    assert (probed.grid, probed.downsample) == (8, 4)   # native grid found by a probe forward
    mae = {"name": "offline-mae", "pretrained": False, "arch": {"embed_dim": 32, "depth": 1, "num_heads": 2}}
    up = ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone=mae, latent_grid=16)
    assert up(x).shape == (2, 32, 16, 16)      # native 8 -> interpolated up to 16
    assert up.weights_source == "random"
    with pytest.raises(ValueError, match="must divide"):
        ENCODERS.get("backbone")(in_channels=1, image_size=32, backbone=MOBILENET, latent_grid=5)
