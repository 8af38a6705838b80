"""Stage 0 of SSL-feature cells without downloadable weights: train the offline MAE backbone.

Runs only for priors whose backbone is ``offline-mae`` (backbones/offline_mae.py). Keyed by the
dataset and the backbone's architecture and training settings, so every cell and seed that uses
the same backbone shares one trained model, as they would share a downloaded DINOv2.

Data parallel (torchrun / srun tasks, as the teacher stage; benchmark/distributed.py): the
backbone's ``train.batch_size`` stays the global batch and must divide by the number of
processes. Every rank draws the whole global batch from the stage's data generator (image
indices, flips, then the MAE mask noise, in the order one process draws them), loads and
computes only its slice, and DistributedDataParallel averages the gradients; the masked-patch
loss is a mean over the same number of patches in every slice, so the averaged gradient is the
global batch's and N processes train the weights one process trains up to the order of float
sums (tests/test_ssl_backbone_ddp.py). Rank 0 alone writes checkpoints and ``backbone.pt``.
With one process the draws, and so the outputs, are exactly those of the stage before it was
data parallel (version 1 kept).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbones.offline_mae import MAE, MAE_MEAN, MAE_STD, mae_flops_per_image
from benchmark import distributed
from benchmark.accel import compile_in_place
from benchmark.dag import Node
from benchmark.distributed import DistInfo
from benchmark.stages.common import dataset
from benchmark.store import save_torch
from benchmark.training import Checkpoint, train_steps, warmup_lambda

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"steps": 600, "batch_size": 128, "lr": 1.5e-3, "weight_decay": 0.05,
                  "mask_ratio": 0.75, "warmup_steps": 60, "seed": 0, "checkpoint_every": 200,
                  "compile": False}  # compile: how, not what (in no stage key, benchmark/dag.py HOW_KEYS)


def output(node: Node) -> dict:
    """What the backbone that needed this stage gets: constructor overrides naming the weights."""
    return {"checkpoint": str(node.dir / "backbone.pt")}


class MaskedLoss(nn.Module):
    """``MAE.loss`` as a forward: DistributedDataParallel averages the gradients of what its
    module's forward returns, and the MAE has no forward of its own (``encode`` serves features).
    Holds the MAE itself, so the MAE's state_dict keeps its keys."""

    def __init__(self, mae: MAE) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> torch.Tensor:
        return self.mae.loss(x, mask_ratio, noise=noise)


def run(node: Node, info: DistInfo | None = None) -> dict:
    bcfg = node.params["backbone"]  # the backbone config the offline-MAE backbone declared
    tr = {**TRAIN_DEFAULTS, **(bcfg.get("train") or {})}
    # run_stage joined the launcher's group (if any); a grid worker gets one process here.
    info = info or distributed.current(node.cfg["device"])
    steps, bs = int(tr["steps"]), int(tr["batch_size"])
    if bs % info.world_size:
        # Checked before the dataset is read: every rank fails at once, before any collective.
        raise ValueError(f"the offline-mae backbone's train.batch_size={bs} (prior.backbone.train.batch_size) "
                         f"is the global batch and must divide evenly over {info.world_size} processes; "
                         f"use a multiple of {info.world_size}")
    img_size = int(bcfg.get("img_size", 32))
    train = dataset(node.cfg, "train")
    if train.resolution != img_size:
        raise ValueError(f"offline-mae img_size {img_size} != dataset resolution {train.resolution}")
    device = info.device
    seed = int(tr["seed"])
    torch.manual_seed(seed)  # every rank builds the same initial weights
    mae = MAE(img_size=img_size, **(bcfg.get("arch") or {})).to(device).train()
    opt = torch.optim.AdamW(mae.parameters(), lr=float(tr["lr"]), betas=(0.9, 0.95),
                            weight_decay=float(tr["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(int(tr["warmup_steps"])))
    gen = torch.Generator().manual_seed(seed + 3)
    mean = torch.tensor(MAE_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(MAE_STD, device=device).view(1, 3, 1, 1)
    mask_ratio = float(tr["mask_ratio"])
    ckpt = Checkpoint(node.dir / "ckpt.pt", int(tr["checkpoint_every"]))
    per_rank = bs // info.world_size
    rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)  # this rank's slice of the global batch
    masked_loss: nn.Module = MaskedLoss(mae)
    if tr.get("compile"):
        # The wrapper, whose forward is MAE.loss (MAE itself has no forward); in place, so
        # backbone.pt keeps the plain MAE's keys. How, not what: in no stage key.
        compile_in_place(masked_loss)
    if info.distributed:
        # The buffers are fixed sine-cosine tables: nothing to sync per forward.
        masked_loss = DistributedDataParallel(masked_loss, device_ids=[device.index] if device.type == "cuda" else None,
                                              forward_sync_buffers=False)

    def loss_at(step: int) -> torch.Tensor:
        # The global batch's draws, in the order the one-process stage drew them (indices, flips,
        # then the mask noise MAE.loss drew from the same generator): every rank advances `gen`
        # alike, so the checkpointed generator state is the same whichever rank saves it.
        idx = torch.randint(len(train), (bs,), generator=gen)
        # Random horizontal flips: the one augmentation MAE uses besides crops (which would
        # lose most of a 32 px image).
        flip = torch.rand(bs, generator=gen) < 0.5
        noise = torch.rand(bs, mae.num_patches, generator=gen)
        # Images are decoded per index, so loading only this rank's rows gives exactly the rows
        # of the whole batch.
        x = train.float_batch(idx[rows]).to(device)
        x = torch.where(flip[rows].view(-1, 1, 1, 1).to(device), x.flip(-1), x)
        x = (x.expand(-1, 3, -1, -1) - mean) / std
        return masked_loss(x, mask_ratio, noise[rows])

    start, recent, elapsed = train_steps("ssl_backbone", mae, opt, sched, gen, ckpt, steps, loss_at, window=50,
                                         info=info)
    if info.is_main:
        save_torch(node.dir / "backbone.pt", {k: v.cpu() for k, v in mae.state_dict().items()})
        ckpt.remove()
    # Images of the global batch per second: the throughput of all processes together.
    ips = (steps - start) * bs / max(elapsed, 1e-9)
    out = {"ssl_final_loss": sum(recent) / max(1, len(recent)), "ssl_steps": steps,
           "ssl_params": sum(p.numel() for p in mae.parameters()), "ssl_images_per_s": ips,
           "ssl_gflops_per_s": ips * mae_flops_per_image(mae, mask_ratio) / 1e9}
    distributed.barrier()  # the other ranks return only once rank 0 has written its files
    return out
