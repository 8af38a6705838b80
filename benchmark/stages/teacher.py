"""Stage 2: the dm loss's teacher, a flow-matching score network trained on samples of p_ref
and then frozen. Only built when the prior has no exact score or ``loss.teacher=trained``."""
from __future__ import annotations

import logging
import time

import torch

from benchmark.dag import Node
from benchmark.stages.common import build_score_net, load_prior
from benchmark.store import save_torch
from benchmark.training import Checkpoint, check_finite, progress, resolve_device, warmup_lambda
from generators import flow_matching_loss, random_labels

log = logging.getLogger(__name__)


def run(node: Node) -> dict:
    cfg, loss_cfg = node.cfg, node.cfg["loss"]
    prior = load_prior(node)
    device = resolve_device(cfg["device"])
    net = build_score_net(cfg).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=float(loss_cfg["teacher_lr"]), betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(100))
    steps, bs = int(loss_cfg["teacher_steps"]), int(loss_cfg["teacher_batch_size"])
    ncls = int(cfg["dataset"]["num_classes"])
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 101)
    torch.manual_seed(int(cfg["seed"]) + 101)
    ckpt = Checkpoint(node.dir / "ckpt.pt", every=250)
    start = 0
    if (state := ckpt.load()) is not None:
        net.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"]); gen.set_state(state["data_rng"]); start = state["step"]
    t0, recent = time.perf_counter(), []
    bar = progress(steps, "teacher", start)
    for step in range(start, steps):
        y = random_labels(bs, ncls, generator=gen)
        z = prior.sample(bs, generator=gen, labels=y)
        loss = flow_matching_loss(net, z.to(device), y.to(device))
        check_finite(loss, "teacher", step)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(); sched.step()
        recent = (recent + [float(loss.detach())])[-100:]
        bar.update(1)
        if ckpt.due(step + 1) and step + 1 < steps:
            ckpt.save(step + 1, model=net.state_dict(), opt=opt.state_dict(),
                      sched=sched.state_dict(), data_rng=gen.get_state())
    bar.close()
    save_torch(node.dir / "teacher.pt", {k: v.cpu() for k, v in net.state_dict().items()})
    ckpt.remove()
    elapsed = time.perf_counter() - t0
    return {"teacher_final_fm_loss": sum(recent) / max(1, len(recent)),
            "teacher_steps_per_s": (steps - start) / max(elapsed, 1e-9)}
