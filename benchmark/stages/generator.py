"""Stage 5: train the latent generator (flow-matching DiT) on the tokenizer's normalised
latents of the training split, with EMA weights for sampling."""
from __future__ import annotations

import logging
import time

import torch

from benchmark.dag import Node, latent_shape
from benchmark.data import subset
from benchmark.stages.common import dataset, encode_all, load_tokenizer
from benchmark.store import save_torch
from benchmark.training import Checkpoint, check_finite, progress, warmup_lambda
from generators import EMA, build_generator, flow_matching_loss

log = logging.getLogger(__name__)


def build_model(cfg: dict) -> torch.nn.Module:
    g = cfg["generator"]
    c, h, _ = latent_shape(cfg)
    args = dict(g.get("model_args", {}))
    args.setdefault("class_dropout_prob", float(g["label_dropout"]))
    return build_generator(g["model"], input_size=h, in_channels=c,
                           num_classes=int(cfg["dataset"]["num_classes"]), **args)


def run(node: Node) -> dict:
    cfg, gc = node.cfg, node.cfg["generator"]
    seed = int(cfg["seed"])
    torch.manual_seed(seed + 1)
    tok, lnorm = load_tokenizer(node.deps["tokenizer"])
    train = subset(dataset(cfg, "train"), int(gc["train_images"]), seed=seed)
    z_all = lnorm.normalize(encode_all(tok, train))
    y_all = train.labels
    model = build_model(cfg).train()
    ema = EMA(model, float(gc["ema_decay"]))
    opt = torch.optim.AdamW(model.parameters(), lr=float(gc["lr"]), betas=tuple(gc["betas"]),
                            weight_decay=float(gc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(int(gc["lr_warmup_steps"])))
    steps, bs = int(gc["steps"]), int(gc["batch_size"])
    data_rng = torch.Generator().manual_seed(seed + 11)
    ckpt = Checkpoint(node.dir / "ckpt.pt", int(gc["checkpoint_every"]))
    start = 0
    if (state := ckpt.load()) is not None:
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        data_rng.set_state(state["data_rng"]); start = state["step"]
    t0, recent = time.perf_counter(), []
    bar = progress(steps, "generator", start)
    for step in range(start, steps):
        idx = torch.randint(len(z_all), (bs,), generator=data_rng)
        loss = flow_matching_loss(model, z_all[idx], y_all[idx], t_kind=gc["t_sampling"])
        check_finite(loss, "generator", step)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(gc["grad_clip"]))
        opt.step(); sched.step(); ema.update(model)
        recent = (recent + [float(loss.detach())])[-100:]
        bar.update(1)
        if ckpt.due(step + 1) and step + 1 < steps:
            ckpt.save(step + 1, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                      sched=sched.state_dict(), data_rng=data_rng.get_state())
    bar.close()
    elapsed = time.perf_counter() - t0
    save_torch(node.dir / "ema.pt", ema.module.state_dict())
    ckpt.remove()
    return {"generator_final_fm_loss": sum(recent) / max(1, len(recent)),
            "generator_steps_per_s": (steps - start) / max(elapsed, 1e-9),
            "generator_params": sum(p.numel() for p in model.parameters())}
