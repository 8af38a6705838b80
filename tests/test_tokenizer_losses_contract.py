"""tokenizers/losses.py against independent implementations.

DiffAugment (Zhao et al. 2020) is recomputed with explicit per-image loops from the same
random draws; the PatchGAN's layer layout is checked against pix2pix/taming's
NLayerDiscriminator description; the perceptual loss against a direct torchvision MobileNetV2
computation; LPIPS-VGG's wiring through a stand-in ``lpips`` module.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from tokenizers import losses as L


# ------------------------------------------------------------------ pixel / hinge / helpers

def test_pixel_loss_weights():
    x = torch.zeros(1, 1, 2, 2)
    y = torch.tensor([0.0, 1.0, -2.0, 0.0]).view(1, 1, 2, 2)     # |d| mean 0.75, d^2 mean 1.25
    assert float(L.pixel_loss(y, x)) == pytest.approx(0.75)      # defaults: L1 only
    assert float(L.pixel_loss(y, x, l1_weight=2.0)) == pytest.approx(1.5)
    assert float(L.pixel_loss(y, x, 0.0, 3.0)) == pytest.approx(3.75)
    assert float(L.pixel_loss(y, x, 0.5, 0.5)) == pytest.approx(0.375 + 0.625)
    # a non-zero target: the difference, not the sum, is penalised
    t = torch.full((1, 1, 2, 2), 1.0)
    assert float(L.pixel_loss(t + 0.5, t)) == pytest.approx(0.5)
    assert float(L.pixel_loss(t + 0.5, t, 0.0, 1.0)) == pytest.approx(0.25)


def test_rgb_expands_only_grey():
    g = torch.rand(2, 1, 3, 3)
    out = L._rgb(g)
    assert out.shape == (2, 3, 3, 3) and all(torch.equal(out[:, i], g[:, 0]) for i in range(3))
    c = torch.rand(2, 3, 3, 3)
    assert L._rgb(c) is c
    two = torch.rand(1, 2, 3, 3)
    assert L._rgb(two) is two


def test_hinge_losses_asymmetric_values():
    real = torch.tensor([0.25, 3.0])     # relu(1 - r): 0.75, 0
    fake = torch.tensor([-0.5, 2.0])     # relu(1 + f): 0.5, 3
    assert float(L.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.375 + 1.75))
    assert float(L.hinge_g_loss(torch.tensor([1.0, 2.0, 6.0]))) == pytest.approx(-3.0)


def test_adaptive_weight_clamps_and_detaches():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (w * torch.tensor([3.0, 4.0])).sum()                  # |grad| = 5
    gan = (w * torch.tensor([0.0, 0.5])).sum()                  # |grad| = 0.5
    out = L.adaptive_weight(rec, gan, w)
    assert float(out) == pytest.approx(5 / (0.5 + 1e-4), rel=1e-7) and not out.requires_grad
    assert float(L.adaptive_weight(rec, gan, w, max_weight=2.0)) == 2.0
    assert float(L.adaptive_weight(rec, -gan, w, max_weight=20.0)) == pytest.approx(5 / (0.5 + 1e-4))
    zero_gan = (w * 0.0).sum()
    assert float(L.adaptive_weight(rec, zero_gan, w)) == pytest.approx(1e4)     # 5 / 1e-4 = 5e4 -> 1e4
    weak = (w * torch.tensor([0.0, 0.1])).sum()                 # |grad rec| 0.1 < |grad gan| 0.5
    assert float(L.adaptive_weight(weak, gan, w)) == pytest.approx(0.1 / (0.5 + 1e-4), rel=1e-6)
    small = (w * torch.tensor([0.0, 1e-4])).sum()
    assert float(L.adaptive_weight(rec, small, w, max_weight=1e6)) == pytest.approx(5 / 2e-4, rel=1e-6)
    # the graph stays usable afterwards (retain_graph): the caller still backpropagates rec
    rec.backward()
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))


# ------------------------------------------------------------------ PatchGAN

def _convs(d):
    return [m for m in d.net if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_patch_discriminator_layout(n_layers):
    d = L.PatchDiscriminator(in_channels=3, ndf=4, n_layers=n_layers)
    convs = _convs(d)
    widths = [4 * min(2 ** i, 8) for i in range(n_layers + 1)]
    assert [c.in_channels for c in convs] == [3] + widths
    assert [c.out_channels for c in convs] == widths + [1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.stride[0] for c in convs] == [2] * n_layers + [1, 1]
    assert [c.bias is not None for c in convs] == [True] + [False] * n_layers + [True]
    norms = [m for m in d.net if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == widths[1:]
    acts = [m for m in d.net if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == n_layers + 1 and all(a.negative_slope == 0.2 for a in acts)
    # the layer order: conv, act, then (conv, norm, act) per layer, then the logit conv
    kinds = [type(m).__name__ for m in d.net]
    assert kinds == ["Conv2d", "LeakyReLU"] + ["Conv2d", "BatchNorm2d", "LeakyReLU"] * n_layers + ["Conv2d"]


def test_patch_discriminator_defaults_and_group_norm():
    d = L.PatchDiscriminator()
    convs = _convs(d)
    assert convs[0].in_channels == 3 and [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    g = L.PatchDiscriminator(in_channels=1, ndf=8, n_layers=3, norm="group")
    gns = [m for m in g.net if isinstance(m, nn.GroupNorm)]
    assert [(n.num_groups, n.num_channels) for n in gns] == [(16, 16), (32, 32), (32, 64)]
    with pytest.raises(ValueError, match=r"PatchGAN norm must be 'batch' or 'group', got 'layer'"):
        L.PatchDiscriminator(norm="layer")


def test_patch_discriminator_output_and_input_scaling():
    d = L.PatchDiscriminator(in_channels=1, ndf=4, n_layers=3, norm="group").eval()
    x = torch.rand(2, 1, 32, 32)
    out = d(x)
    assert out.shape == (2, 1, 2, 2)        # 32 -> 16 -> 8 -> 4 -> 3 -> 2 (70x70-style receptive field)
    torch.testing.assert_close(out, d.net(x * 2 - 1))


# ------------------------------------------------------------------ DiffAugment

def _draws(seed, n_total, *shape):
    return torch.rand(n_total, *shape, generator=torch.Generator().manual_seed(seed))


def test_rand_slices_rows_of_the_full_draw():
    g = torch.Generator().manual_seed(3)
    part = L._rand(g, 5, 1, 3, 2)
    torch.testing.assert_close(part, _draws(3, 5, 2)[1:4], rtol=0, atol=0)


def test_color_by_hand():
    x = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = L._color(x, torch.Generator().manual_seed(7), 3, 0)
    g = torch.Generator().manual_seed(7)
    r1, r2, r3 = (torch.rand(3, 1, 1, 1, generator=g) for _ in range(3))
    ref = torch.empty_like(x)
    for i in range(3):
        a = x[i] + (r1[i] - 0.5)
        a = (a - a.mean(0, keepdim=True)) * (2 * r2[i]) + a.mean(0, keepdim=True)
        ref[i] = (a - a.mean()) * (r3[i] + 0.5) + a.mean()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _translate_ref(x, r, ratio=0.125):
    n, c, h, w = x.shape
    sy, sx = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    out = torch.zeros_like(x)
    for i in range(n):
        dy = min(int(r[i, 0] * (2 * sy + 1)), 2 * sy) - sy
        dx = min(int(r[i, 1] * (2 * sx + 1)), 2 * sx) - sx
        for y in range(h):
            for xx in range(w):
                ys, xs = y - dy, xx - dx
                if 0 <= ys < h and 0 <= xs < w:
                    out[i, :, y, xx] = x[i, :, ys, xs]
    return out, sy, sx


def test_translation_by_hand():
    x = torch.rand(8, 2, 16, 24, generator=torch.Generator().manual_seed(1)) + 1  # no zeros inside
    out = L._translation(x, torch.Generator().manual_seed(5), 10, 2)
    r = _draws(5, 10, 2)[2:10]
    ref, sy, sx = _translate_ref(x, r)
    assert (sy, sx) == (2, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (out == 0).any()   # some image was shifted: zero fill entered


def test_translation_covers_all_shifts_symmetrically():
    n = 400
    x = torch.zeros(n, 1, 8, 8)
    x[:, :, 4, 4] = 1.0                       # a single bright pixel: its new position is the shift
    out = L._translation(x, torch.Generator().manual_seed(0), n, 0)
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 8 - 4, pos % 8 - 4
    assert set(dy.tolist()) == {-1, 0, 1} and set(dx.tolist()) == {-1, 0, 1}


def _cutout_ref(x, r, ratio=0.5):
    n, c, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    out = x.clone()
    for i in range(n):
        cy = int(r[i, 0] * (h + 1 - ch % 2))
        cx = int(r[i, 1] * (w + 1 - cw % 2))
        for y in range(cy - ch // 2, cy - ch // 2 + ch):
            for xx in range(cx - cw // 2, cx - cw // 2 + cw):
                if 0 <= y < h and 0 <= xx < w:
                    out[i, :, y, xx] = 0
    return out


@pytest.mark.parametrize("h,w", [(16, 24), (9, 7), (7, 9), (9, 9), (2, 9), (9, 2)])
def test_cutout_by_hand(h, w):
    x = torch.rand(12, 2, h, w, generator=torch.Generator().manual_seed(2)) + 1
    out = L._cutout(x, torch.Generator().manual_seed(4), 15, 3)
    ref = _cutout_ref(x, _draws(4, 15, 2)[3:15])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_augments_keep_dtype(dtype):
    x = torch.rand(3, 2, 8, 8).to(dtype)
    for name, fn in L.AUGMENTS.items():
        assert fn(x, torch.Generator().manual_seed(0), 3, 0).dtype == dtype, name


def test_augments_follow_the_input_device():
    # the meta device stands in for a GPU: a tensor created on the CPU by mistake cannot be
    # combined with x there, exactly as it could not with a CUDA x
    x = torch.empty(3, 2, 8, 8, device="meta")
    for name, fn in L.AUGMENTS.items():
        out = fn(x, torch.Generator().manual_seed(0), 3, 0)
        assert out.device.type == "meta" and out.shape == x.shape, name


def test_diff_augment_policy_parsing_and_order():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seq = L._cutout(L._translation(L._color(x, torch.Generator().manual_seed(1), 4, 0),
                                   torch.Generator().manual_seed(2), 4, 0), torch.Generator().manual_seed(3), 4, 0)
    g = torch.Generator().manual_seed(9)
    a = L.diff_augment(x, "color,,translation", g)
    g2 = torch.Generator().manual_seed(9)
    b = L._translation(L._color(x, g2, 4, 0), g2, 4, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    g = torch.Generator().manual_seed(9)
    c = L.diff_augment(x, ["cutout"], g, n_total=6, offset=1)
    torch.testing.assert_close(c, L._cutout(x, torch.Generator().manual_seed(9), 6, 1), rtol=0, atol=0)
    assert torch.equal(L.diff_augment(x, "", torch.Generator()), x)
    with pytest.raises(ValueError, match=r"unknown DiffAugment policy 'flip'; known: \['color', 'cutout', 'translation'\]"):
        L.diff_augment(x, "color,flip", torch.Generator())
    assert seq.shape == x.shape


# ------------------------------------------------------------------ PatchGAN wrapper

def test_patchgan_wrapper():
    p = L.PatchGAN(in_channels=1, weight="0.25", start_step="10", ndf=4, n_layers=2, norm="group",
                   diffaug="translation", lr="1e-3", betas=[0.4, 0.8], max_weight="7")
    assert (p.weight, p.start_step, p.max_weight) == (0.25, 10, 7.0)
    assert [c.out_channels for c in _convs(p.disc)] == [4, 8, 16, 1]
    assert any(isinstance(m, nn.GroupNorm) for m in p.disc.net)
    (group,) = p.opt.param_groups
    assert isinstance(p.opt, torch.optim.Adam) and group["lr"] == 1e-3 and group["betas"] == (0.4, 0.8)
    assert {id(q) for q in group["params"]} == {id(q) for q in p.disc.parameters()}
    assert not p.active(9) and p.active(10) and p.active(11)
    assert not L.PatchGAN(1, weight=0.0, ndf=4, n_layers=1).active(100)
    assert p.describe() == {"gan": "patchgan-hinge", "gan_weight": 0.25, "gan_start_step": 10,
                            "gan_diffaug": "translation"}
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(p.augment(x, torch.Generator().manual_seed(1)),
                               L._translation(x, torch.Generator().manual_seed(1), 2, 0), rtol=0, atol=0)
    part = p.augment(x, torch.Generator().manual_seed(1), n_total=4, offset=2)
    torch.testing.assert_close(part, L._translation(x, torch.Generator().manual_seed(1), 4, 2), rtol=0, atol=0)
    torch.testing.assert_close(p.logits(x), p.disc(x))
    none = L.PatchGAN(1, ndf=4, n_layers=1, diffaug=None)
    assert none.diffaug == "" and none.augment(x, torch.Generator()) is x


def test_patchgan_defaults():
    p = L.PatchGAN(in_channels=3)
    assert (p.weight, p.start_step, p.max_weight, p.diffaug) == (0.5, 0, 1e4, "color,translation,cutout")
    (group,) = p.opt.param_groups
    assert group["lr"] == 2e-5 and group["betas"] == (0.5, 0.9)
    assert [c.out_channels for c in _convs(p.disc)] == [64, 128, 256, 512, 1]
    assert any(isinstance(m, nn.BatchNorm2d) for m in p.disc.net)
    assert p.active(0)


# ------------------------------------------------------------------ perceptual losses

def test_build_perceptual_unknown_and_registry():
    assert set(L.PERCEPTUAL) == {"mobilenet_v2", "lpips-vgg"}
    with pytest.raises(ValueError, match=r"unknown perceptual loss 'vgg'; known: \['lpips-vgg', 'mobilenet_v2'\]"):
        L.build_perceptual("vgg")


class _FakeLPIPS(nn.Module):
    calls: list = []

    def __init__(self, net, verbose):
        super().__init__()
        self.args = (net, verbose)
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, a, b):
        _FakeLPIPS.calls.append((a, b))
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)


def test_lpips_vgg_wiring_with_stand_in_module(monkeypatch):
    fake = types.ModuleType("lpips")
    fake.LPIPS = _FakeLPIPS
    monkeypatch.setitem(sys.modules, "lpips", fake)
    _FakeLPIPS.calls.clear()
    m = L.build_perceptual("lpips-vgg")
    assert m.name == "lpips-vgg" and m.net.args == ("vgg", False)
    assert not m.net.training and not any(p.requires_grad for p in m.net.parameters())
    m.train()
    assert not m.training and not m.net.training
    x_rec, x = torch.full((2, 1, 4, 4), 0.75), torch.full((2, 1, 4, 4), 0.25)
    out = m(x_rec, x)
    (a, b), = _FakeLPIPS.calls
    assert a.shape == (2, 3, 4, 4) and torch.allclose(a, torch.full_like(a, 0.5))   # 0.75 * 2 - 1
    assert torch.allclose(b, torch.full_like(b, -0.5))
    assert float(out) == pytest.approx((1.0 + 3.0) / 2)   # the mean over the batch's distances


def test_lpips_vgg_unavailable_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)   # import lpips -> ImportError
    with pytest.raises(RuntimeError, match=r"perceptual loss 'lpips-vgg' is unavailable \(ModuleNotFoundError: .*install it with: pip install lpips"):
        L.LPIPSVGG()


def test_mobilenet_perceptual_matches_direct_torchvision_computation():
    from benchmark.metrics.mobilenet import mobilenet_weights_path
    from torchvision.models import mobilenet_v2
    m = L.build_perceptual("mobilenet_v2")
    assert m.name == "mobilenet_v2" and m.TAPS == (1, 3, 6, 13) and len(m.features) == 14
    m.train()
    assert not m.training and not any(mod.training for mod in m.modules())
    net = mobilenet_v2(weights=None)
    net.load_state_dict(torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True))
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=gen)
    x_rec = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)

    def taps(im):
        h, out = (im.expand(-1, 3, -1, -1) - mean) / std, []
        for i in range(14):
            h = net.features[i](h)
            if i in (1, 3, 6, 13):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        ref = sum(((a - b) ** 2).sum(1).mean() for a, b in zip(taps(x_rec), taps(x)))
        ours = m(x_rec, x)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert float(m(x, x)) == 0.0
    # the ImageNet normalisation is not state: checkpoints hold only the trunk's weights
    keys = set(m.state_dict())
    assert "mean" not in keys and "std" not in keys and keys == {f"features.{k}" for k in net.features[:14].state_dict()}
