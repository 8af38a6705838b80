"""Reconstruction losses of the tokenizer: perceptual, PatchGAN hinge, DiffAugment, adaptive weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizers import losses
from tokenizers.losses import (PatchDiscriminator, adaptive_weight, build_perceptual, diff_augment,
                               hinge_d_loss, hinge_g_loss, pixel_loss)


def test_pixel_loss_values():
    x, y = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    assert float(pixel_loss(y, x, 1.0, 0.0)) == pytest.approx(0.5)
    assert float(pixel_loss(y, x, 1.0, 2.0)) == pytest.approx(0.5 + 2 * 0.25)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])    # relu(1 - r) = 0, 0.5, 2   -> mean 2.5/3
    fake = torch.tensor([-2.0, 0.0, 1.0])    # relu(1 + f) = 0, 1, 2     -> mean 1
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0 / 3)


def test_adaptive_weight_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    rec = (w * torch.tensor([[1.0, 0.0], [0.0, 0.0]])).sum() * 3      # grad: 3 at [0,0] -> norm 3
    gan = (w * torch.tensor([[0.0, 1.0], [1.0, 0.0]])).sum() * 2      # grad: 2 at two entries -> 2*sqrt2
    expect = 3.0 / (2 * 2 ** 0.5 + 1e-4)
    assert float(adaptive_weight(rec, gan, w)) == pytest.approx(expect, rel=1e-6)
    tiny = (w * 1e-12).sum()                                          # |grad gan| ~ 0 -> clamped
    assert float(adaptive_weight(rec * 1e6, tiny, w)) == 1e4
    # Data parallel: `reduce` averages each gradient with the other rank's. Rank 1's gradients
    # here are rec: 1 at [1,1] and gan: 0 -> means rec (1.5, 0, 0, 0.5), gan (0, 1, 1, 0), so the
    # weight is |(1.5, .5)| / |(1, 1)| = sqrt(2.5) / sqrt(2), not the local 3 / (2 sqrt 2).
    other = iter([torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 2)])
    averaged = adaptive_weight(rec, gan, w, reduce=lambda g: (g + next(other)) / 2)
    assert float(averaged) == pytest.approx(2.5 ** 0.5 / (2 ** 0.5 + 1e-4), rel=1e-6)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_patch_discriminator_shapes(n_layers):
    d = PatchDiscriminator(in_channels=1, ndf=8, n_layers=n_layers, norm="group")
    out = d(torch.rand(2, 1, 32, 32))
    assert out.shape[:2] == (2, 1) and out.shape[-1] > 1  # one logit per patch
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="layer")


def test_diffaugment_shapes_determinism_and_slicing():
    x = torch.rand(6, 3, 16, 16)
    a = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(1))
    b = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(1))
    c = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # rows [2, 6) drawn as part of a batch of 6 equal the whole batch's rows 2..5
    part = diff_augment(x[2:], "color,translation,cutout", torch.Generator().manual_seed(1), n_total=6, offset=2)
    torch.testing.assert_close(part, a[2:], rtol=0, atol=0)
    # cutout zeroes a (ratio 0.5)^2 = a quarter of the pixels of a constant image, at most
    cut = diff_augment(torch.ones(4, 1, 16, 16), "cutout", torch.Generator().manual_seed(0))
    zero_frac = (cut == 0).float().mean(dim=(1, 2, 3))
    assert bool(((zero_frac > 0) & (zero_frac <= 0.25)).all())
    # translation moves content and fills with zeros; it is differentiable
    xg = torch.rand(2, 1, 8, 8, requires_grad=True)
    diff_augment(xg, "translation", torch.Generator().manual_seed(0)).sum().backward()
    assert xg.grad is not None
    with pytest.raises(ValueError, match="unknown DiffAugment"):
        diff_augment(x, "flip", torch.Generator())


def test_mobilenet_perceptual_zero_for_identical_positive_otherwise():
    p = build_perceptual("mobilenet_v2")
    assert p.name == "mobilenet_v2" and not any(q.requires_grad for q in p.parameters())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(p(x, x)) == 0.0
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    xr = y.clone().requires_grad_(True)
    d = p(xr, x)
    d.backward()
    assert float(d.detach()) > 0 and xr.grad is not None and float(xr.grad.abs().sum()) > 0
    p.train()
    assert not p.training  # BatchNorm statistics stay ImageNet's


def test_lpips_unavailable_names_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_lpips(name, *a, **k):
        if name == "lpips":
            raise ImportError("No module named 'lpips'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lpips)
    with pytest.raises(RuntimeError, match="pip install lpips"):
        build_perceptual("lpips-vgg")
    with pytest.raises(ValueError, match="known: .*mobilenet_v2"):
        build_perceptual("vgg")
    assert set(losses.PERCEPTUAL) == {"mobilenet_v2", "lpips-vgg"}
