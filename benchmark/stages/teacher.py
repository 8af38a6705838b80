"""Stage 2: a flow-matching score network trained on samples of p_ref, then frozen: the dm
loss's teacher when the prior has no exact score (or ``loss.teacher=trained``), else the
network its fake network starts from (``loss.fake_init: pretrained``).

With ``loss.teacher_plateau`` set, ``teacher_steps`` is a ceiling: a fixed held-out set of p_ref
samples (with fixed t and noise) is scored every ``eval_every`` steps; at a plateau the learning
rate is cut (``decays`` times, by ``decay_factor``) and training stops at the plateau after the
last cut. The curve is recorded (``teacher_curve.json``): a teacher cut off while
still improving is a biased teacher, and the dm gradient inherits its bias.

Data parallel (torchrun / srun tasks, as the generator; benchmark/distributed.py):
``loss.teacher_batch_size`` stays the global batch. Every rank draws the whole global batch
(labels and p_ref samples from the stage's data generator; noise, t and the label-dropout mask
from torch's global RNG, seeded alike on every rank) in the order one process draws them, and
computes only its slice; DistributedDataParallel averages the gradients, so N processes train
the weights one process trains up to the order of float sums (tests/test_generator_scale.py).
The held-out evaluation of the plateau rule runs on every rank and rank 0's value decides for
all (benchmark/training.py PlateauStop). Rank 0 alone writes checkpoints and outputs. With one
process the draws, and so the outputs, are exactly those of the stage before it was data
parallel (version 3 kept)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmark import distributed
from benchmark.accel import adamw, compile_in_place
from benchmark.dag import Node
from benchmark.stages.common import build_score_net, load_prior
from benchmark.store import load_torch, save_torch, write_json
from benchmark.distributed import DistInfo
from benchmark.training import Checkpoint, PlateauStop, train_steps, warmup_lambda
from generators import interpolate, random_labels, sample_t, velocity_target

log = logging.getLogger(__name__)


def output(node: Node) -> torch.nn.Module:
    """The trained score network, for the dm loss that declared this stage."""
    net = build_score_net(node.cfg)
    net.load_state_dict(load_torch(node.dir / "teacher.pt"))
    return net


def take_label_dropout(net: torch.nn.Module) -> float:
    """The score net's label-dropout probability, switched off in the net: the stage draws the
    mask for the whole global batch itself (``slice_loss``). 0 for a net without a label embedder
    of generators/dit.py's kind."""
    emb = getattr(net, "y_embedder", None)
    p = float(getattr(emb, "dropout_prob", 0.0))
    if p > 0:
        emb.dropout_prob = 0.0
    return p


def slice_loss(net, z: torch.Tensor, y: torch.Tensor, p_drop: float, null_label: int,
               rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Flow-matching loss of this rank's slice of the global batch (z, y), on z's device.

    The draws are generators.flow_matching_loss's with the net's own label dropout, in its order
    and from the same global RNG: noise [B, ...], then t [B] (sample_t "uniform"), then the
    dropout coins [B] (LabelEmbedder.forward). Drawn for the whole global batch on every rank,
    then sliced, so the slices of N ranks are exactly the one process's batch; with one process
    the loss is bit-identical to flow_matching_loss(net_with_dropout, z, y)."""
    b = z.shape[0]
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype)
    t = sample_t(b, "uniform", device=z.device)
    if p_drop > 0:
        u = torch.rand(b, device=y.device)
        y = torch.where(u < p_drop, torch.full_like(y, null_label), y)
    n = b // world_size
    s = slice(rank * n, (rank + 1) * n)
    v = net(interpolate(z[s], eps[s], t[s]), t[s], y[s])
    return F.mse_loss(v.float(), velocity_target(z[s], eps[s]).float())


def run(node: Node, info: DistInfo | None = None) -> dict:
    cfg, loss_cfg = node.cfg, node.cfg["loss"]
    prior = load_prior(node)
    # run_stage joined the launcher's group (if any); a grid worker gets one process here.
    info = info or distributed.current(cfg["device"])
    device = info.device
    # Seed before building the network: its initialisation must not depend on whatever the
    # process ran before (a grid worker runs many stages), or reruns and resumes would differ.
    # The key's seed (loss.teacher_seed), never the cell's: the stage is shared by every seed.
    seed = int(loss_cfg.get("teacher_seed", 0))
    torch.manual_seed(seed + 101)
    net = build_score_net(cfg).train().to(device)
    if loss_cfg.get("compile"):
        # In place, before DDP wraps it: teacher.pt keeps the plain module's keys (loss.compile is
        # not in any stage key: fused kernels change float rounding only, benchmark/dag.py).
        compile_in_place(net)
    opt = adamw(net.parameters(), device, lr=float(loss_cfg["teacher_lr"]), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(100))
    steps, bs = int(loss_cfg["teacher_steps"]), int(loss_cfg["teacher_batch_size"])
    if bs % info.world_size:
        raise ValueError(f"loss.teacher_batch_size={bs} is the global batch and must divide evenly over "
                         f"{info.world_size} processes; use a multiple of {info.world_size}")
    ncls = int(cfg["dataset"]["num_classes"])
    p_drop = take_label_dropout(net)
    ddp = net
    if info.distributed:
        # Buffers are fixed tables (RoPE, sin-cos), as in the generator: nothing to sync per forward.
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
    gen = torch.Generator().manual_seed(seed + 101)
    # How often to save is not part of the stage key (benchmark/dag.py): resume is bit-exact.
    ckpt = Checkpoint(node.dir / "ckpt.pt", every=int(loss_cfg.get("teacher_checkpoint_every", 100)))

    def loss_at(step: int) -> torch.Tensor:
        y = random_labels(bs, ncls, generator=gen)
        z = prior.sample(bs, generator=gen, labels=y)
        return slice_loss(ddp, z.to(device), y.to(device), p_drop, ncls, info.rank, info.world_size)

    monitor = plateau_monitor(net, prior, loss_cfg.get("teacher_plateau"), ncls, seed, device)
    if monitor is not None:
        def decay(factor: float) -> None:
            # LambdaLR multiplies its base rates each step; scaling them (saved in the
            # scheduler's state) makes the decay survive a resume.
            sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        monitor.on_decay = decay
    start, recent, elapsed = train_steps("teacher", net, opt, sched, gen, ckpt, steps, loss_at, window=100,
                                         monitor=monitor, info=info)
    if info.is_main:
        save_torch(node.dir / "teacher.pt", {k: v.cpu() for k, v in net.state_dict().items()})
        ckpt.remove()
    run_steps = steps if monitor is None or monitor.stopped_at is None else monitor.stopped_at
    out = {"teacher_final_fm_loss": sum(recent) / max(1, len(recent)), "teacher_steps_run": run_steps,
           "teacher_steps_per_s": (run_steps - start) / max(elapsed, 1e-9),
           "teacher_compile": bool(loss_cfg.get("compile", False))}
    if monitor is not None:
        if info.is_main:
            write_json(node.dir / "teacher_curve.json", {"step_heldout_fm": monitor.curve})
        out.update(teacher_stopped="plateau" if monitor.stopped_at is not None else "max_steps",
                   teacher_lr_decays=monitor.decayed,
                   teacher_heldout_fm=monitor.curve[-1][1] if monitor.curve else float("nan"))
    distributed.barrier()  # the other ranks return only once rank 0 has written its files
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
