"""Stage 0 of SSL-feature cells without downloadable weights: train the offline MAE backbone.

Runs only for priors whose backbone is ``offline-mae`` (backbones/offline_mae.py). Keyed by the
dataset and the backbone's architecture and training settings, so every cell and seed that uses
the same backbone shares one trained model, as they would share a downloaded DINOv2.
"""
from __future__ import annotations

import logging

import torch

from backbones.offline_mae import MAE, MAE_MEAN, MAE_STD, mae_flops_per_image
from benchmark.dag import Node
from benchmark.stages.common import dataset
from benchmark.store import save_torch
from benchmark.training import Checkpoint, resolve_device, train_steps, warmup_lambda

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"steps": 600, "batch_size": 128, "lr": 1.5e-3, "weight_decay": 0.05,
                  "mask_ratio": 0.75, "warmup_steps": 60, "seed": 0, "checkpoint_every": 200}


def output(node: Node) -> dict:
    """What the backbone that needed this stage gets: constructor overrides naming the weights."""
    return {"checkpoint": str(node.dir / "backbone.pt")}


def run(node: Node) -> dict:
    bcfg = node.params["backbone"]  # the backbone config the offline-MAE backbone declared
    tr = {**TRAIN_DEFAULTS, **(bcfg.get("train") or {})}
    img_size = int(bcfg.get("img_size", 32))
    train = dataset(node.cfg, "train")
    if train.resolution != img_size:
        raise ValueError(f"offline-mae img_size {img_size} != dataset resolution {train.resolution}")
    device = resolve_device(node.cfg["device"])
    seed = int(tr["seed"])
    torch.manual_seed(seed)
    mae = MAE(img_size=img_size, **(bcfg.get("arch") or {})).to(device).train()
    opt = torch.optim.AdamW(mae.parameters(), lr=float(tr["lr"]), betas=(0.9, 0.95),
                            weight_decay=float(tr["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(int(tr["warmup_steps"])))
    gen = torch.Generator().manual_seed(seed + 3)
    mean = torch.tensor(MAE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(MAE_STD, device=device).view(1, 3, 1, 1)
    steps, bs = int(tr["steps"]), int(tr["batch_size"])
    ckpt = Checkpoint(node.dir / "ckpt.pt", int(tr["checkpoint_every"]))

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(train), (bs,), generator=gen)
        x = train.float_batch(idx).to(device)
        # Random horizontal flips: the one augmentation MAE uses besides crops (which would
        # lose most of a 32 px image).
        flip = torch.rand(bs, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(device), x.flip(-1), x)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        return mae.loss(x, float(tr["mask_ratio"]), generator=gen)

    start, recent, elapsed = train_steps("ssl_backbone", mae, opt, sched, gen, ckpt, steps, loss_at, window=50)
    save_torch(node.dir / "backbone.pt", {k: v.cpu() for k, v in mae.state_dict().items()})
    ckpt.remove()
    ips = (steps - start) * bs / max(elapsed, 1e-9)
    return {"ssl_final_loss": sum(recent) / max(1, len(recent)), "ssl_steps": steps,
            "ssl_params": sum(p.numel() for p in mae.parameters()), "ssl_images_per_s": ips,
            "ssl_gflops_per_s": ips * mae_flops_per_image(mae, float(tr["mask_ratio"])) / 1e9}
