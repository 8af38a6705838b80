"""The 2-D toy bench of DMVAE (Ye et al. 2025, Fig. 3): free points matched to a 2-D density.

Each method moves N learnable points (init N(0, 0.5^2 I)) the way the tokenizer stage moves
latents: the method's loss on the points, and its own networks (dm's fake score, the
adversarial discriminator) updated on the detached points every iteration. Because the points
are free parameters, what is compared is the gradient field each loss induces, not an encoder's
capacity; the points' optimiser (``SharedScaleAdam``) removes each loss's overall scale without
bending that field. Methods:

- dm               the paper's loss (priors/losses/dm.py): a frozen teacher (small score MLP
                   trained here on target samples), a fake network initialised from it and
                   trained online, points stepped every ``vae_train_every`` iterations;
- real_score_only  the "flow prior" the paper rejects: points follow x_hat_real - z (dm with
                   the fake estimate replaced by the point itself), same normaliser as dm;
- fake_score_max   the other rejected variant, as we read it: points ascend the real score and
                   also maximise the fake network's likelihood end to end (its flow-matching
                   loss back-propagated into the points and the network in one backward);
- mmd, swd, adversarial  the registered losses, with the target as the prior's sampler;
- gauss_kl         KL(N(mean, cov of the points) || N(mean, cov of the target)): a Gaussian
                   moment-matching stand-in for the VAE's KL (free points have no posterior).

Metrics: sliced W2 to fresh target samples (floor: the ``reference`` row, fresh target
samples in place of points) and mode coverage (see ``coverage``). Writes results.json,
results.md, one PNG per (target, method) and overview.png to --out (default runs/toy).

    python -m benchmark.toy [--targets ring8,s_curve,moons] [--methods dm,...] [--steps N]
                            [--out runs/toy] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from benchmark.store import save_figure, write_json, write_text
from generators import flow_matching_loss, interpolate, sample_t, velocity_to_x1
from priors.losses.adversarial import AdversarialMatching
from priors.losses.base import MatchingLoss
from priors.losses.dm import DistributionMatching
from priors.losses.mmd import MMDMatching
from priors.losses.swd import SlicedWasserstein, random_directions, sliced_w2_sq

log = logging.getLogger(__name__)

RING_RADIUS, RING_STD = 2.0, 0.1   # ring of 8 Gaussians as in the unrolled-GAN toy (Metz et al. 2017),
                                    # wider modes (their std is 0.02) so a small MLP can fit them
CURVE_NOISE = 0.05                  # isotropic noise added to the S-curve and the moons
METHODS = ("dm", "real_score_only", "fake_score_max", "mmd", "swd", "adversarial", "gauss_kl")
TARGET_NAMES = ("ring8", "s_curve", "moons")


# ----------------------------------------------------------------------------- targets
def ring8_means() -> Tensor:
    ang = torch.arange(8) * (2 * math.pi / 8)
    return RING_RADIUS * torch.stack([ang.cos(), ang.sin()], 1)


def _ring8(n: int, g: torch.Generator) -> Tensor:
    return ring8_means()[torch.randint(8, (n,), generator=g)] + RING_STD * torch.randn(n, 2, generator=g)


def _s_curve(n: int, g: torch.Generator) -> Tensor:
    # The (x, z) face of the 3-D S-curve manifold: t in [-3pi/2, 3pi/2], x = sin t,
    # y = sign(t)(cos t - 1); uniform in t, so the density is flat along the curve.
    t = 3 * math.pi * (torch.rand(n, generator=g) - 0.5)
    pts = torch.stack([t.sin(), t.sign() * (t.cos() - 1)], 1)
    return pts + CURVE_NOISE * torch.randn(n, 2, generator=g)


def _moons(n: int, g: torch.Generator) -> Tensor:
    # Two interleaved half circles of radius 1, centred on the origin; equal mass per moon.
    th = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, th.cos(), 1 - th.cos()) - 0.5
    y = torch.where(upper, th.sin(), 0.5 - th.sin()) - 0.25
    return torch.stack([x, y], 1) + CURVE_NOISE * torch.randn(n, 2, generator=g)


TARGETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "ring8": _ring8, "s_curve": _s_curve, "moons": _moons}


class ToyTarget:
    """A target density with the prior interface the sample-based losses use."""
    latent_shape = (2,)
    class_conditional = False

    def __init__(self, name: str) -> None:
        if name not in TARGETS:
            raise ValueError(f"unknown toy target {name!r}; known: {', '.join(TARGETS)}")
        self.name = name

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: Tensor | None = None) -> Tensor:
        return TARGETS[self.name](n, generator if generator is not None else torch.default_generator)


# ----------------------------------------------------------------------------- score network
class ScoreMLP(nn.Module):
    """(x, t) -> velocity for 2-D points: the toy stand-in for FlowDiT (same call signature)."""
    null_label = -1  # unconditional: guidance with the null label is a no-op

    def __init__(self, hidden: int = 128, depth: int = 3, n_freq: int = 6) -> None:
        super().__init__()
        # Fourier features of t at periods 2 .. 2^-(n_freq - 2): t alone is too smooth an input.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq), persistent=False)
        layers: list[nn.Module] = []
        width = 2 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **_: Any) -> Tensor:
        ang = t.reshape(-1, 1).to(x.dtype) * self.freqs
        return self.net(torch.cat([x, ang.sin(), ang.cos()], 1))


def train_teacher(target: ToyTarget, steps: int, seed: int, batch: int = 256, lr: float = 4e-3) -> ScoreMLP:
    """Flow matching on fresh target samples (cosine-decayed Adam), then frozen."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = ScoreMLP()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    y = torch.zeros(batch, dtype=torch.long)
    for _ in range(steps):
        loss = flow_matching_loss(net, target.sample(batch, g), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- toy-only methods
def _real_direction(teacher: nn.Module, z: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """x_hat_real at a random (t, eps) and dm's per-sample normaliser mean|z - x_hat_real|."""
    with torch.no_grad():
        t = sample_t(z.shape[0], "uniform")
        x_t = interpolate(z, torch.randn_like(z), t)
        x_real = velocity_to_x1(x_t, teacher(x_t, t, labels), t)
        return x_real, (z - x_real).abs().mean(1, keepdim=True)


class RealScoreOnly(MatchingLoss):
    """The "flow prior": points move to x_hat_real (maximise the real score only)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__(1.0)
        self.teacher = teacher

    def forward(self, z, labels, step, posterior=None):
        x_real, norm = _real_direction(self.teacher, z.detach(), labels)
        g = torch.nan_to_num((z.detach() - x_real) / norm)
        return 0.5 * (z - (z - g).detach()).pow(2).mean(), {}


class FakeScoreMax(MatchingLoss):
    """Real-score ascent plus the fake network's own likelihood, maximised end to end."""

    def __init__(self, teacher: nn.Module, fake_lr: float) -> None:
        super().__init__(1.0)
        self.teacher = teacher
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.fake_opt = torch.optim.Adam(self.fake.parameters(), lr=fake_lr)

    def forward(self, z, labels, step, posterior=None):
        x_real, norm = _real_direction(self.teacher, z.detach(), labels)
        g = torch.nan_to_num((z.detach() - x_real) / norm)
        real = 0.5 * (z - (z - g).detach()).pow(2).mean()
        return real + flow_matching_loss(self.fake, z, labels), {}

    def update(self, z, labels, step):
        # The same backward filled the fake network's gradients: apply them (end to end).
        if any(p.grad is not None for p in self.fake.parameters()):
            self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)
        return {}


class GaussKL(MatchingLoss):
    """Stand-in for kl: KL between Gaussian fits of the points and of the target (2-D, closed form)."""

    def __init__(self, target: ToyTarget, seed: int) -> None:
        super().__init__(1.0)
        ref = target.sample(50_000, torch.Generator().manual_seed(seed))
        self.mp, cov = ref.mean(0), torch.cov(ref.T)
        self.cov_p_inv, self.logdet_p = torch.linalg.inv(cov), torch.logdet(cov)

    def forward(self, z, labels, step, posterior=None):
        mq, cq = z.mean(0), torch.cov(z.T)
        d = self.mp - mq
        kl = 0.5 * (torch.trace(self.cov_p_inv @ cq) + d @ self.cov_p_inv @ d - 2
                    + self.logdet_p - torch.logdet(cq))
        return kl, {}


def build_method(name: str, target: ToyTarget, teacher: nn.Module, seed: int) -> MatchingLoss:
    torch.manual_seed(seed)  # network initialisations
    if name == "dm":
        # Paper defaults except the fake lr: the toy's fake must follow points that move 100x
        # faster than an encoder's latents (paper: 2e-5 at ImageNet scale).
        return DistributionMatching(teacher=teacher, latent_shape=(2,), num_classes=1,
                                    vae_train_every=5, fake_lr=1e-3, fake_weight_decay=0.0)
    if name == "real_score_only":
        return RealScoreOnly(teacher)
    if name == "fake_score_max":
        return FakeScoreMax(teacher, fake_lr=1e-3)
    if name == "mmd":
        return MMDMatching(prior=target, seed=seed)
    if name == "swd":
        return SlicedWasserstein(prior=target, n_projections=64, seed=seed)
    if name == "adversarial":
        return AdversarialMatching(latent_shape=(2,), prior=target, hidden=128, lr=1e-3, seed=seed)
    if name == "gauss_kl":
        return GaussKL(target, seed)
    raise ValueError(f"unknown toy method {name!r}; known: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- matching loop
class SharedScaleAdam(torch.optim.Optimizer):
    """Adam with one second-moment scalar per tensor (the mean of the squared gradient).

    Plain Adam on free points normalises every coordinate of every point separately, which bends
    the loss's vector field (a smooth affine pull turns into axis-aligned sign steps). Sharing
    the scale keeps each step a positive multiple of the momentum, as an encoder's shared weights
    would, while still removing the loss's overall scale so one lr serves every method.
    """

    def __init__(self, params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros((), dtype=p.dtype))
                st["step"] += 1
                st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
                st["v"].mul_(b2).add_(p.grad.pow(2).mean(), alpha=1 - b2)
                m_hat = st["m"] / (1 - b1 ** st["step"])
                v_hat = st["v"] / (1 - b2 ** st["step"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


def match_points(loss_fn: MatchingLoss, n_points: int, steps: int, lr: float, seed: int) -> Tensor:
    """``steps`` updates of the points; a loss with tokenizer_every = k gets k times as many
    iterations of its own networks (the trainer's alternating schedule)."""
    torch.manual_seed(seed)
    pts = (0.5 * torch.randn(n_points, 2, generator=torch.Generator().manual_seed(seed))).requires_grad_(True)
    opt = SharedScaleAdam([pts], lr=lr)
    # Linear decay to 0 over the last half: the per-step jitter would otherwise blur the modes.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2.0 * (1 - s / steps)))
    labels = torch.zeros(n_points, dtype=torch.long)
    every = loss_fn.tokenizer_every
    for it in range(steps * every):
        z_det = pts.detach().clone()
        if it % every == 0:
            loss, _ = loss_fn(pts, labels, it)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        loss_fn.update(z_det, labels, it)
    return pts.detach()


# ----------------------------------------------------------------------------- metrics
def sliced_w2(points: Tensor, target: ToyTarget, g: torch.Generator, repeats: int = 4) -> float:
    """SW_2 to fresh equal-size target samples, 256 directions, averaged over draws."""
    vals = [sliced_w2_sq(points, target.sample(points.shape[0], g), random_directions(2, 256, g))
            for _ in range(repeats)]
    return float(torch.stack(vals).mean().sqrt())


def _kmeans(x: Tensor, k: int, g: torch.Generator, iters: int = 50) -> Tensor:
    """Lloyd's algorithm from k distinct random samples (deterministic given g)."""
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c


def target_bins(target: ToyTarget, seed: int, k: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """(centres [K, 2], radii [K], target mass [K]) of the regions coverage is counted in.

    ring8: the 8 true modes, radius 3 std (holds 1 - e^-4.5 = 98.9% of a mode's mass).
    s_curve, moons: K-means bins of 20,000 target samples, radius = the 99th percentile of the
    bin's own samples' distance to its centre (the same ~99% rule for a curve-shaped density).
    """
    if target.name == "ring8":
        return ring8_means(), torch.full((8,), 3 * RING_STD), torch.full((8,), 1 / 8)
    g = torch.Generator().manual_seed(seed + 17)
    ref = target.sample(20_000, g)
    c = _kmeans(ref, k, g)
    d, a = torch.cdist(ref, c).min(1)
    radii = torch.stack([d[a == j].quantile(0.99) for j in range(k)])
    mass = torch.bincount(a, minlength=k).float() / ref.shape[0]
    return c, radii, mass


def coverage(points: Tensor, bins: tuple[Tensor, Tensor, Tensor], share: float = 0.25) -> tuple[float, float]:
    """(coverage, on_target): a bin is covered when it holds >= share x its fair share of points
    (fair share = its target mass x N); a point counts for its nearest centre if within radius.
    on_target is the fraction of points that count for some bin (1 - it = points off the density)."""
    centres, radii, mass = bins
    d, a = torch.cdist(points, centres).min(1)
    inside = d <= radii[a]
    counts = torch.bincount(a[inside], minlength=centres.shape[0]).float()
    covered = counts >= share * mass * points.shape[0]
    return float(covered.float().mean()), float(inside.float().mean())


# ----------------------------------------------------------------------------- output
PLOT_LIM = 3.0  # every target lies within [-2.5, 2.5]^2


def _draw(ax: Any, points: Tensor, ref: Tensor, title: str) -> None:
    """Target density (2-D histogram of reference samples, grey) under the points (red)."""
    lim = PLOT_LIM
    ax.hist2d(ref[:, 0].numpy(), ref[:, 1].numpy(), bins=120, range=[[-lim, lim], [-lim, lim]],
              cmap="Greys", cmin=1)
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=3, c="tab:red", alpha=0.7, lw=0)
    ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim); ax.set_aspect("equal")
    ax.set_xticks([]); ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def plot_results(results: list[tuple[dict[str, Any], Tensor]], refs: dict[str, Tensor], out: Path) -> None:
    """One PNG per (target, method) and an overview grid (rows: targets, columns: methods)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for row, pts in results:
        fig, ax = plt.subplots(figsize=(3.2, 3.2))
        _draw(ax, pts, refs[row["target"]],
              f"{row['target']} / {row['method']}: SW2 {row['swd']:.3f}, cov {row['coverage']:.2f}")
        fig.tight_layout()
        save_figure(out / f"{row['target']}_{row['method']}.png", fig, dpi=110)
        plt.close(fig)
    targets = list(dict.fromkeys(r["target"] for r, _ in results))
    methods = list(dict.fromkeys(r["method"] for r, _ in results))
    fig, axes = plt.subplots(len(targets), len(methods), squeeze=False,
                             figsize=(2.0 * len(methods), 2.1 * len(targets)))
    for row, pts in results:
        ax = axes[targets.index(row["target"])][methods.index(row["method"])]
        _draw(ax, pts, refs[row["target"]], f"{row['method']}\nSW2 {row['swd']:.2f} cov {row['coverage']:.2f}")
    for i, t in enumerate(targets):
        axes[i][0].set_ylabel(t)
    fig.tight_layout()
    save_figure(out / "overview.png", fig, dpi=100)
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | method | sliced W2 (lower better) | mode coverage | on target | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['method']} | {r['swd']:.3f} | {r['coverage']:.2f} | "
                     f"{r['on_target']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def run(targets: list[str], methods: list[str], steps: int, out: Path, seed: int = 0,
        n_points: int = 512, lr: float = 2e-2, teacher_steps: int = 3000) -> list[dict[str, Any]]:
    """Match points for every (target, method); write results.{json,md} and the PNGs to out."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown toy method(s) {unknown}; known: {', '.join(METHODS)}")
    targets_obj = [ToyTarget(t) for t in targets]  # unknown targets fail here, before any work
    out = Path(out)
    results: list[tuple[dict[str, Any], Tensor]] = []
    refs: dict[str, Tensor] = {}
    teacher_secs: dict[str, float] = {}
    for target in targets_obj:
        tname = target.name
        bins = target_bins(target, seed)
        refs[tname] = target.sample(50_000, torch.Generator().manual_seed(seed + 23))
        teacher = None
        if any(m in ("dm", "real_score_only", "fake_score_max") for m in methods):
            t0 = time.perf_counter()
            teacher = train_teacher(target, teacher_steps, seed)
            teacher_secs[tname] = time.perf_counter() - t0
            log.info("%s: teacher trained (%d steps) in %.1f s", tname, teacher_steps, teacher_secs[tname])
        for mname in ("reference", *methods):
            t0 = time.perf_counter()
            if mname == "reference":  # the metrics' floor: fresh target samples as the points
                pts = target.sample(n_points, torch.Generator().manual_seed(seed + 99))
            else:
                pts = match_points(build_method(mname, target, teacher, seed), n_points, steps, lr, seed)
            secs = time.perf_counter() - t0
            finite = bool(torch.isfinite(pts).all())
            pts = pts.nan_to_num()
            cov, on = coverage(pts, bins)
            swd = sliced_w2(pts, target, torch.Generator().manual_seed(seed + 5))
            row = {"target": tname, "method": mname, "swd": swd, "coverage": cov, "on_target": on,
                   "seconds": secs, "finite": finite}
            results.append((row, pts))
            log.info("%-8s %-16s SW2 %.3f  coverage %.2f  on-target %.2f  (%.1f s)",
                     tname, mname, swd, cov, on, secs)
    rows = [r for r, _ in results]
    cfg = {"targets": targets, "methods": methods, "steps": steps, "seed": seed, "n_points": n_points,
           "lr": lr, "teacher_steps": teacher_steps, "ring": [RING_RADIUS, RING_STD],
           "curve_noise": CURVE_NOISE}
    write_json(out / "results.json", {"config": cfg, "teacher_seconds": teacher_secs, "rows": rows})
    table = markdown_table(rows)
    write_text(out / "results.md", table)
    plot_results(results, refs, out)
    log.info("\n%s", table)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="2-D toy bench: match learnable points to a 2-D density "
                                             "with each matching loss (DMVAE Fig. 3 setting).")
    ap.add_argument("--targets", default=",".join(TARGET_NAMES), help=f"comma list of {TARGET_NAMES}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    ap.add_argument("--steps", type=int, default=500, help="point updates per method")
    ap.add_argument("--teacher-steps", type=int, default=3000, help="flow-matching steps of each teacher")
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; the toy's matrices are too small to gain from more")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    t0 = time.perf_counter()
    run(split(a.targets), split(a.methods), a.steps, a.out, a.seed, a.points, teacher_steps=a.teacher_steps)
    log.info("toy bench done in %.1f s; results in %s", time.perf_counter() - t0, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
