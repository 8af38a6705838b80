"""How faithful is the dm loss's gradient? Measured against a case whose answer is known.

With q = p_ref the true distribution-matching gradient is 0, so whatever the loss returns is
error: the fake network's error plus the teacher's. With a 1.5x scale mismatch on N(0, I) both
scores are exact (a scaled Gaussian has a closed-form velocity), so the rms of g there is the
size of a real signal. Their ratio says whether the dm loss's direction is signal or noise at
the start of the DM phase; the tests (tests/test_dm_fidelity.py) and the README quote it.

    python -m benchmark.dm_fidelity                  # the cpu-tiny dm settings
"""
from __future__ import annotations

import argparse
import json
import logging
import copy
from typing import Callable

import torch
from torch import nn

from generators import random_labels
from priors.base import ExactTeacher
from priors.losses.dm import DistributionMatching

log = logging.getLogger(__name__)


class ScaledGaussianVelocity(nn.Module):
    """Exact velocity of N(0, s^2 I) on the path x_t = t z + (1 - t) eps (t = 1 is data):
    Cov(z - eps, x_t) = t s^2 - (1 - t) and Var(x_t) = t^2 s^2 + (1 - t)^2 per dimension."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.s2 = float(scale) ** 2
        self.null_label = -1  # unconditional: guidance is a no-op

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (t * self.s2 - (1 - t)) / (t * t * self.s2 + (1 - t) ** 2) * x


class _Normal:
    """N(0, I) with an exact velocity, standing in for the gaussian prior without its registry."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.latent_shape = tuple(shape)
        self._v = ScaledGaussianVelocity(1.0)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._v(x, t, None)


@torch.no_grad()
def direction_rms(loss: DistributionMatching, draw: Callable[[int, torch.Generator], torch.Tensor],
                  num_classes: int, n: int = 4096, batch: int = 512, seed: int = 0) -> float:
    """rms over ``n`` latents of the dm direction g (per element), latents from ``draw``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # t and eps inside the loss come from the global RNG
    total, count = 0.0, 0
    for i in range(0, n, batch):
        m = min(batch, n - i)
        z = draw(m, g)
        d = loss.direction(z, random_labels(m, num_classes, generator=g))
        total += float(d.pow(2).sum())
        count += d.numel()
    return (total / count) ** 0.5


def _dm(teacher: nn.Module, fake: nn.Module, shape: tuple[int, ...], num_classes: int,
        cfg_scale: float = 1.0) -> DistributionMatching:
    loss = DistributionMatching(teacher=ExactTeacher(_Normal(shape)), latent_shape=shape,
                                num_classes=num_classes, cfg_scale=cfg_scale)
    loss.teacher = teacher.eval().requires_grad_(False)
    loss.fake = fake
    return loss


def mismatch_signal(shape: tuple[int, ...], num_classes: int, scale: float = 1.5, **kw) -> float:
    """rms of the exact dm direction when q = N(0, scale^2 I) and p_ref = N(0, I)."""
    loss = _dm(ExactTeacher(_Normal(shape)), ScaledGaussianVelocity(scale), shape, num_classes)
    return direction_rms(loss, lambda m, g: scale * torch.randn(m, *shape, generator=g), num_classes, **kw)


def spurious(teacher: nn.Module, fake: nn.Module, shape: tuple[int, ...], num_classes: int,
             cfg_scale: float = 1.0, **kw) -> float:
    """rms of the dm direction with q = p_ref = N(0, I): pure error (the true value is 0)."""
    loss = _dm(teacher, fake, shape, num_classes, cfg_scale)
    return direction_rms(loss, lambda m, g: torch.randn(m, *shape, generator=g), num_classes, **kw)


def preset_config(overrides: dict | None = None) -> dict:
    """The cpu-tiny tokenizer, the dm loss preset and Fashion-MNIST, as one cell would see them."""
    import yaml
    from benchmark.conf import __file__ as conf_init
    from pathlib import Path
    conf = Path(conf_init).parent
    load = lambda *parts: yaml.safe_load(conf.joinpath(*parts).read_text())  # noqa: E731
    cfg = {"prior": {"name": "gaussian"}, "dataset": load("dataset", "fashion_mnist.yaml"),
           "tokenizer": load("tokenizer", "cpu-tiny.yaml"), "loss": {"name": "dm", **load("loss", "dm.yaml")},
           "seed": 0, "device": "cpu"}
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    return cfg


def train_teacher(cfg: dict, root) -> tuple[nn.Module, dict]:
    """The teacher stage itself, on N(0, I), in a scratch directory."""
    from benchmark.dag import Node
    from benchmark.stages import teacher
    from benchmark.stages.common import build_score_net
    from benchmark.store import load_torch, save_torch
    from priors import PRIORS
    shape = (int(cfg["tokenizer"]["latent_channels"]), 8, 8)
    ref = Node("reference", "reference-fidelity", {}, {}, cfg, root)
    ref.dir.mkdir(parents=True, exist_ok=True)
    save_torch(ref.dir / "prior.pt", PRIORS.get("gaussian")(latent_shape=shape).state_dict())
    node = Node("teacher", "teacher-fidelity", {}, {"reference": ref}, cfg, root)
    node.dir.mkdir(parents=True, exist_ok=True)
    record = teacher.run(node)
    net = build_score_net(cfg)
    net.load_state_dict(load_torch(node.dir / "teacher.pt"))
    return net, record


def fake_after(cfg: dict, inputs: dict, steps: int, lr: float | None = None) -> DistributionMatching:
    """The dm loss as the tokenizer stage builds it, its fake trained ``steps`` steps on q = p_ref."""
    from benchmark.settings import TokenizerSettings
    from priors import PRIORS
    tc, shape, ncls = cfg["tokenizer"], (4, 8, 8), int(cfg["dataset"]["num_classes"])
    lc = {k: v for k, v in cfg["loss"].items() if k != "name"}
    if lr is not None:
        lc["fake_lr"] = lr
    loss = DistributionMatching.from_config(
        lc, inputs=inputs, prior=PRIORS.get("gaussian")(latent_shape=shape), latent_shape=shape, num_classes=ncls,
        tokenizer_optim=TokenizerSettings.from_dict(tc, "tokenizer").matching_optim())
    g = torch.Generator().manual_seed(123)
    bs = int(tc["batch_size"])
    for step in range(steps):
        loss.update(torch.randn(bs, *shape, generator=g), random_labels(bs, ncls, generator=g), step)
    return loss


def main(argv: list[str] | None = None) -> None:
    import tempfile
    from pathlib import Path
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fake-lr", type=float, nargs="*", default=[], help="extra fake rates to compare")
    ap.add_argument("--set", nargs="*", default=[], help="section.key=value (JSON values), e.g. "
                                                          "loss.teacher_lr=3e-4")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    over = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    cfg = preset_config(over)
    shape, ncls = (4, 8, 8), int(cfg["dataset"]["num_classes"])
    signal = mismatch_signal(shape, ncls)
    with tempfile.TemporaryDirectory() as tmp:
        net, record = train_teacher(cfg, Path(tmp))
    # The fake starts training with the DM phase (the dm loss's update_in_warmup = False): at its
    # start the fake is the pre-trained network; over the phase it takes match_iters steps.
    warm, dm_steps = 0, int(cfg["tokenizer"]["match_iters"])
    exact = ExactTeacher(_Normal(shape))
    out = {"signal_1.5x": signal, "teacher": record,
           "teacher_vs_exact": spurious(exact, copy.deepcopy(net), shape, ncls) / signal}
    for lr in [None, *args.fake_lr]:
        tag = "preset" if lr is None else f"{lr:g}"
        out[f"exact_teacher_fake_at_dm_start[{tag}]"] = direction_rms(
            fake_after(cfg, {"fake_init": net}, warm, lr), lambda m, g: torch.randn(m, *shape, generator=g), ncls) / signal
        out[f"trained_teacher_fake_after_dm[{tag}]"] = direction_rms(
            fake_after(cfg, {"teacher": copy.deepcopy(net)}, dm_steps, lr),
            lambda m, g: torch.randn(m, *shape, generator=g), ncls) / signal
        log.info(json.dumps(out))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
