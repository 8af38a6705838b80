"""Stage 2: the dm loss's teacher, a flow-matching score network trained on samples of p_ref
and then frozen. Only built when the prior has no exact score or ``loss.teacher=trained``."""
from __future__ import annotations

import logging

import torch

from benchmark.dag import Node
from benchmark.stages.common import build_score_net, load_prior
from benchmark.store import load_torch, save_torch
from benchmark.training import Checkpoint, resolve_device, train_steps, warmup_lambda
from generators import flow_matching_loss, random_labels

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
    torch.manual_seed(int(cfg["seed"]) + 101)
    net = build_score_net(cfg).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(loss_cfg["teacher_lr"]), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(100))
    steps, bs = int(loss_cfg["teacher_steps"]), int(loss_cfg["teacher_batch_size"])
    ncls = int(cfg["dataset"]["num_classes"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 101)
    # How often to save is not part of the stage key (benchmark/dag.py): resume is bit-exact.
    ckpt = Checkpoint(node.dir / "ckpt.pt", every=int(loss_cfg.get("teacher_checkpoint_every", 100)))

    def loss_at(step: int) -> torch.Tensor:
        y = random_labels(bs, ncls, generator=gen)
        z = prior.sample(bs, generator=gen, labels=y)
        return flow_matching_loss(net, z.to(device), y.to(device))

    start, recent, elapsed = train_steps("teacher", net, opt, sched, gen, ckpt, steps, loss_at, window=100)
    save_torch(node.dir / "teacher.pt", {k: v.cpu() for k, v in net.state_dict().items()})
    ckpt.remove()
    return {"teacher_final_fm_loss": sum(recent) / max(1, len(recent)),
            "teacher_steps_per_s": (steps - start) / max(elapsed, 1e-9)}
