"""Stage 2: a flow-matching score network trained on samples of p_ref, then frozen: the dm
loss's teacher when the prior has no exact score (or ``loss.teacher=trained``), else the
network its fake network starts from (``loss.fake_init: pretrained``).

With ``loss.teacher_plateau`` set, ``teacher_steps`` is a ceiling: a fixed held-out set of p_ref
samples (with fixed t and noise) is scored every ``eval_every`` steps; at a plateau the learning
rate is cut (``decays`` times, by ``decay_factor``) and training stops at the plateau after the
last cut. The curve is recorded (``teacher_curve.json``): a teacher cut off while
still improving is a biased teacher, and the dm gradient inherits its bias."""
from __future__ import annotations

import logging

import torch

from benchmark.accel import adamw
from benchmark.dag import Node
from benchmark.stages.common import build_score_net, load_prior
from benchmark.store import load_torch, save_torch, write_json
from benchmark.training import Checkpoint, PlateauStop, resolve_device, train_steps, warmup_lambda
from generators import flow_matching_loss, interpolate, random_labels, velocity_target

log = logging.getLogger(__name__)


def output(node: Node) -> torch.nn.Module:
    """The trained score network, for the dm loss that declared this stage."""
    net = build_score_net(node.cfg)
    net.load_state_dict(load_torch(node.dir / "teacher.pt"))
    return net


def run(node: Node) -> dict:
    cfg, loss_cfg = node.cfg, node.cfg["loss"]
    prior = load_prior(node)
    device = resolve_device(cfg["device"])
    # Seed before building the network: its initialisation must not depend on whatever the
    # process ran before (a grid worker runs many stages), or reruns and resumes would differ.
    # The key's seed (loss.teacher_seed), never the cell's: the stage is shared by every seed.
    seed = int(loss_cfg.get("teacher_seed", 0))
    torch.manual_seed(seed + 101)
    net = build_score_net(cfg).train().to(device)
    opt = adamw(net.parameters(), device, lr=float(loss_cfg["teacher_lr"]), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(100))
    steps, bs = int(loss_cfg["teacher_steps"]), int(loss_cfg["teacher_batch_size"])
    ncls = int(cfg["dataset"]["num_classes"])
    gen = torch.Generator().manual_seed(seed + 101)
    # How often to save is not part of the stage key (benchmark/dag.py): resume is bit-exact.
    ckpt = Checkpoint(node.dir / "ckpt.pt", every=int(loss_cfg.get("teacher_checkpoint_every", 100)))

    def loss_at(step: int) -> torch.Tensor:
        y = random_labels(bs, ncls, generator=gen)
        z = prior.sample(bs, generator=gen, labels=y)
        return flow_matching_loss(net, z.to(device), y.to(device))

    monitor = plateau_monitor(net, prior, loss_cfg.get("teacher_plateau"), ncls, seed, device)
    if monitor is not None:
        def decay(factor: float) -> None:
            # LambdaLR multiplies its base rates each step; scaling them (saved in the
            # scheduler's state) makes the decay survive a resume.
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        monitor.on_decay = decay
    start, recent, elapsed = train_steps("teacher", net, opt, sched, gen, ckpt, steps, loss_at, window=100,
                                         monitor=monitor)
    save_torch(node.dir / "teacher.pt", {k: v.cpu() for k, v in net.state_dict().items()})
    ckpt.remove()
    run_steps = steps if monitor is None or monitor.stopped_at is None else monitor.stopped_at
    out = {"teacher_final_fm_loss": sum(recent) / max(1, len(recent)), "teacher_steps_run": run_steps,
           "teacher_steps_per_s": (run_steps - start) / max(elapsed, 1e-9)}
    if monitor is not None:
        write_json(node.dir / "teacher_curve.json", {"step_heldout_fm": monitor.curve})
        out.update(teacher_stopped="plateau" if monitor.stopped_at is not None else "max_steps",
                   teacher_lr_decays=monitor.decayed,
                   teacher_heldout_fm=monitor.curve[-1][1] if monitor.curve else float("nan"))
    return out


def plateau_monitor(net: torch.nn.Module, prior, rule: dict | None, ncls: int, seed: int,
                    device: torch.device) -> PlateauStop | None:
    """The plateau rule on a held-out set: ``rule["heldout"]`` samples of p_ref with their own
    labels, t and noise, drawn once from a generator of their own (the training stream is not
    touched, so runs with and without the rule see the same batches)."""
    if not rule:
        return None
    rule = dict(rule)
    n = int(rule.pop("heldout", 2048))
    g = torch.Generator().manual_seed(seed + 977)
    y = random_labels(n, ncls, generator=g)
    z = prior.sample(n, generator=g, labels=y).to(device)
    eps = torch.randn(z.shape, generator=g).to(device)
    t = torch.rand(n, generator=g).to(device)

    @torch.no_grad()
    def heldout() -> float:
        net.eval()  # no label dropout: the same function is scored every time
        total = 0.0
        for i in range(0, n, 512):
            sl = slice(i, i + 512)
            v = net(interpolate(z[sl], eps[sl], t[sl]), t[sl], y[sl].to(device))
            total += float((v.float() - velocity_target(z[sl], eps[sl])).pow(2).mean()) * len(z[sl])
        net.train()
        return total / n

    return PlateauStop(heldout, **rule)
