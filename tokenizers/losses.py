"""Reconstruction losses of the tokenizer: L1/L2, a perceptual loss, and a PatchGAN.

DMVAE's recipe (DMVAE_METHOD.md): L1 (1.0) + LPIPS-VGG (1.0) + a 3-layer PatchGAN (ndf 64) with
hinge loss and DiffAugment, weighted adaptively at the decoder's last layer and switched on at
step 5000. Images here are in [0, 1].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LPIPS_PIP = ("pip install lpips  (and put torchvision's VGG16 ImageNet weights vgg16-397923af.pth in "
             "$TORCH_HOME/hub/checkpoints/, since lpips loads them from the torchvision hub), or use "
             "`perceptual: mobilenet_v2`, which runs on the offline MobileNetV2 weights")


def pixel_loss(x_rec: torch.Tensor, x: torch.Tensor, l1_weight: float = 1.0, l2_weight: float = 0.0) -> torch.Tensor:
    loss = l1_weight * (x_rec - x).abs().mean()
    if l2_weight:
        loss = loss + l2_weight * F.mse_loss(x_rec, x)
    return loss


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class MobileNetPerceptual(nn.Module):
    """LPIPS-style distance on ImageNet MobileNetV2 features (no learned linear layer).

    The LPIPS recipe (Zhang et al. 2018, Eq. 1) with equal layer weights: feature maps of a few
    depths are unit-normalised along channels, squared differences are averaged over space and
    summed over layers. Taps after inverted-residual blocks 1, 3, 6 and 13 of torchvision's
    ``features`` (strides 2, 4, 8, 16) mirror LPIPS-VGG's spread of depths. Images run at their own
    resolution (LPIPS does the same) so that 32 px CPU presets stay cheap.
    """

    name = "mobilenet_v2"
    TAPS = (1, 3, 6, 13)

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2
        from benchmark.metrics.mobilenet import IMAGENET_MEAN, IMAGENET_STD, mobilenet_weights_path
        net = mobilenet_v2(weights=None)
        net.load_state_dict(torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True))
        self.features = net.features[: max(self.TAPS) + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "MobileNetPerceptual":
        return super().train(False)  # BatchNorm statistics stay ImageNet's

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (_rgb(x) - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self._taps(x)
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(self._taps(x_rec), ref))


class LPIPSVGG(nn.Module):
    """LPIPS with the VGG16 trunk and its learned linear heads (the ``lpips`` package)."""

    name = "lpips-vgg"

    def __init__(self) -> None:
        super().__init__()
        try:
            import lpips
            self.net = lpips.LPIPS(net="vgg", verbose=False).eval().requires_grad_(False)
        except Exception as exc:  # missing package, or the VGG weights cannot be fetched offline
            raise RuntimeError(f"perceptual loss 'lpips-vgg' is unavailable ({type(exc).__name__}: {exc}); "
                               f"install it with: {LPIPS_PIP}") from exc

    def train(self, mode: bool = True) -> "LPIPSVGG":
        return super().train(False)

    def forward(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # lpips takes images in [-1, 1]
        return self.net(_rgb(x_rec) * 2 - 1, _rgb(x) * 2 - 1).mean()


PERCEPTUAL = {"mobilenet_v2": MobileNetPerceptual, "lpips-vgg": LPIPSVGG}


def build_perceptual(name: str) -> nn.Module:
    if name not in PERCEPTUAL:
        raise ValueError(f"unknown perceptual loss {name!r}; known: {sorted(PERCEPTUAL)}")
    return PERCEPTUAL[name]()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, Isola et al. 2017; taming-transformers' NLayerDiscriminator layout):
    4x4 convs, stride 2 for the first n_layers, widths ndf * min(2^i, 8), LeakyReLU(0.2), one logit
    per patch. ``norm``: "batch" (pix2pix/taming) or "group" (batch-size independent)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"PatchGAN norm must be 'batch' or 'group', got {norm!r}")

        def nrm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        cin = ndf
        for i in range(1, n_layers + 1):
            cout = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nrm(cout), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)  # images in [0, 1] -> [-1, 1]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; taming's form with the factor 1/2)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, reduce=None) -> torch.Tensor:
    """|d rec / d W| / (|d gan / d W| + 1e-4) at the decoder's last weight W, clamped to
    [0, max_weight] (taming-transformers' VQLPIPSWithDiscriminator.calculate_adaptive_weight; the
    caller multiplies by the GAN weight, 0.5 in DMVAE). ``reduce`` averages both gradients over
    data-parallel ranks, so the weight is the one of the global batch."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        g_rec, g_gan = reduce(g_rec), reduce(g_gan)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---- DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
# Training"): color, translation (1/8 of the side, zero fill), cutout (half the side). The random
# parameters are drawn for `n_total` images from an explicit generator and rows [offset, offset+N)
# are used, so data-parallel ranks together apply exactly what one process applies to the batch.

def _rand(g: torch.Generator, n_total: int, offset: int, n: int, *shape: int) -> torch.Tensor:
    return torch.rand(n_total, *shape, generator=g, device=g.device)[offset: offset + n]


def _color(x, g, n_total, offset):
    n = x.shape[0]
    x = x + (_rand(g, n_total, offset, n, 1, 1, 1).to(x) - 0.5)                     # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (_rand(g, n_total, offset, n, 1, 1, 1).to(x) * 2) + m               # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_rand(g, n_total, offset, n, 1, 1, 1).to(x) + 0.5) + m          # contrast


def _translation(x, g, n_total, offset, ratio=0.125):
    n, _, h, w = x.shape
    sy, sx = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    r = _rand(g, n_total, offset, n, 2).to(x.device)
    # integer shifts uniform in [-s, s], as DiffAugment's randint(-s, s + 1)
    dy = (r[:, :1] * (2 * sy + 1)).floor().long().clamp(max=2 * sy) - sy
    dx = (r[:, 1:] * (2 * sx + 1)).floor().long().clamp(max=2 * sx) - sx
    xp = F.pad(x, (sx, sx, sy, sy))
    ys = torch.arange(h, device=x.device)[None] - dy + sy                             # [N, H]
    xs = torch.arange(w, device=x.device)[None] - dx + sx                             # [N, W]
    out = xp[torch.arange(n, device=x.device)[:, None, None], :, ys[:, :, None], xs[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _cutout(x, g, n_total, offset, ratio=0.5):
    n, _, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    r = _rand(g, n_total, offset, n, 2).to(x.device)
    cy = (r[:, 0] * (h + 1 - ch % 2)).floor().long()[:, None]
    cx = (r[:, 1] * (w + 1 - cw % 2)).floor().long()[:, None]
    ys = torch.arange(h, device=x.device)[None]
    xs = torch.arange(w, device=x.device)[None]
    inside_y = (ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch)                      # [N, H]
    inside_x = (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw)                      # [N, W]
    mask = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * mask[:, None].to(x.dtype)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def diff_augment(x: torch.Tensor, policy: str | list[str], generator: torch.Generator,
                 n_total: int | None = None, offset: int = 0) -> torch.Tensor:
    """Differentiable augmentation of x [N, C, H, W]; policy e.g. "color,translation,cutout"."""
    names = [p for p in (policy.split(",") if isinstance(policy, str) else policy) if p]
    for p in names:
        if p not in AUGMENTS:
            raise ValueError(f"unknown DiffAugment policy {p!r}; known: {sorted(AUGMENTS)}")
        x = AUGMENTS[p](x, generator, n_total or x.shape[0], offset)
    return x


class PatchGAN(nn.Module):
    """Discriminator, its optimiser and the settings of the GAN term, saved together."""

    def __init__(self, in_channels: int, weight: float = 0.5, start_step: int = 0, ndf: int = 64,
                 n_layers: int = 3, norm: str = "batch", diffaug: str = "color,translation,cutout",
                 lr: float = 2e-5, betas: tuple[float, float] = (0.5, 0.9), max_weight: float = 1e4) -> None:
        super().__init__()
        self.weight, self.start_step, self.max_weight = float(weight), int(start_step), float(max_weight)
        self.diffaug = diffaug or ""
        self.disc = PatchDiscriminator(in_channels, int(ndf), int(n_layers), norm)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=float(lr), betas=tuple(betas))

    def active(self, step: int) -> bool:
        return self.weight > 0 and step >= self.start_step

    def augment(self, x, g, n_total=None, offset=0):
        return diff_augment(x, self.diffaug, g, n_total, offset) if self.diffaug else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(x)

    def describe(self) -> dict[str, Any]:
        return {"gan": "patchgan-hinge", "gan_weight": self.weight, "gan_start_step": self.start_step,
                "gan_diffaug": self.diffaug}
