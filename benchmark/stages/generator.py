"""Stage 5: train the latent generator (flow-matching DiT) on the tokenizer's normalised
latents of the training split, with EMA weights for sampling.

The latents come from the latent_cache stage (benchmark/stages/latent_cache.py), memory-mapped:
the encoder never runs here. With ``dataset.hflip`` each draw takes the image's flipped view with
probability 1/2, as LightningDiT trains on its cached flips; without it the batches are exactly
those of the in-memory table this stage encoded before the cache existed.

Data parallel (torchrun or SLURM tasks, see benchmark/distributed.py and benchmark/run_stage.py):
the model is wrapped in DistributedDataParallel and generator.batch_size stays the *global*
batch. Every rank draws the whole global batch (indices, t, noise, label-dropout mask) from one
generator seeded by (seed, step) and computes only its slice, so N processes see exactly the
inputs one process sees, and the averaged gradient is the full-batch gradient up to the order of
float sums. Label dropout is therefore applied here, with the model's own dropout switched off.
Seeding by step also makes resume exact with no RNG state in the checkpoint, and lets a run
checkpointed with one world size continue with another.

Scale (issue #15; the memory arithmetic is in benchmark/conf/generator/paper-in256.yaml):
``generator.grad_accum`` splits a rank's slice into that many micro-batches after the draw, so
the step's inputs stay those of the global batch and only the order of float sums changes;
``generator.precision=bf16`` runs the forward under autocast (weights, AdamW, EMA and the loss
stay fp32); ``generator.activation_checkpointing`` recomputes each DiT block in the backward
pass. Neither of the last two changes the draws.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from benchmark import distributed
from benchmark.dag import Node, latent_shape
from benchmark.distributed import DistInfo
from benchmark.settings import DatasetSettings, GeneratorSettings
from benchmark.stages.latent_cache import LatentCache
from benchmark.store import save_torch, stable_hash
from benchmark.accel import adamw, compile_in_place
from benchmark.monitor import TrainMonitor
from benchmark.training import Checkpoint, check_finite, progress, warmup_lambda
from generators import EMA, build_generator, interpolate, sample_t, velocity_target

log = logging.getLogger(__name__)



def settings(cfg: dict) -> GeneratorSettings:
    return GeneratorSettings.from_dict(cfg["generator"], "generator")


def label_dropout(cfg: dict) -> float:
    g = settings(cfg)
    return float(g.model_args.get("class_dropout_prob", g.label_dropout))


def build_model(cfg: dict, class_dropout_prob: float | None = None) -> torch.nn.Module:
    """The configured generator; class_dropout_prob=0 when the caller drops labels itself."""
    g = settings(cfg)
    c, h, _ = latent_shape(cfg)
    args = dict(g.model_args)
    args["class_dropout_prob"] = label_dropout(cfg) if class_dropout_prob is None else class_dropout_prob
    return build_generator(g.model, input_size=h, in_channels=c,
                           num_classes=DatasetSettings.from_dict(cfg["dataset"], "dataset").num_classes, **args)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # torch's CPU generator (mt19937) uses only the low 32 bits of a seed, so the seed stays in
    # 32 bits: a per-run offset from the cell seed, plus the step (no two steps of a run collide).
    base = int(stable_hash(["generator-batch", int(seed)], 8), 16)
    return torch.Generator(device=device).manual_seed((base + step) % 2**32)


@dataclass
class Batch:
    idx: torch.Tensor   # [B] rows of the latent table
    t: torch.Tensor     # [B] path times
    eps: torch.Tensor   # [B, C, H, W] noise
    drop: torch.Tensor  # [B] bool: replace the label by the null label
    flip: torch.Tensor | None = None  # [B] bool: take the flipped view (dataset.hflip), else None

    def part(self, rank: int, world_size: int) -> "Batch":
        n = self.idx.shape[0] // world_size
        s = slice(rank * n, (rank + 1) * n)
        return Batch(self.idx[s], self.t[s], self.eps[s], self.drop[s], None if self.flip is None else self.flip[s])

    def micro(self, accum: int) -> list["Batch"]:
        """This rank's slice in ``accum`` consecutive micro-batches (generator.grad_accum)."""
        return [self.part(i, accum) for i in range(accum)]


def draw_batch(g: torch.Generator, n_items: int, batch_size: int, shape: tuple[int, ...],
               t_kind: str, p_drop: float, hflip: bool = False) -> Batch:
    """The global batch of one step; the draw order is fixed, so every rank gets the same. The
    flips are drawn last, so switching them on leaves every other draw of the step as it was."""
    dev = g.device
    idx = torch.randint(n_items, (batch_size,), generator=g, device=dev)
    t = sample_t(batch_size, t_kind, generator=g, device=dev)
    eps = torch.randn(batch_size, *shape, generator=g, device=dev)
    drop = torch.rand(batch_size, generator=g, device=dev) < p_drop
    flip = torch.rand(batch_size, generator=g, device=dev) < 0.5 if hflip else None
    return Batch(idx, t, eps, drop, flip)


def latent_rows(latents: torch.Tensor | LatentCache, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """Normalised latents of rows ``idx`` (CPU indices): from the memory-mapped cache, or from an
    in-memory table (tests, notebooks), which has no flipped views."""
    if isinstance(latents, LatentCache):
        return latents.batch(idx, flip)
    if flip is not None:
        raise ValueError("dataset.hflip needs the flipped views of the latent cache; an in-memory latent "
                         "table holds the images' latents only")
    return latents[idx]


def snapshot_steps(fractions, steps: int) -> dict[int, dict]:
    """{step: {"fraction", "step", "file"}} for EMA snapshots at fractions of ``steps`` (0 < f < 1;
    the end of training is ema.pt itself)."""
    out: dict[int, dict] = {}
    for f in fractions:
        f = float(f)
        if not 0.0 < f < 1.0:
            raise ValueError(f"generator.snapshots: fractions must lie in (0, 1), got {f} (ema.pt is the end)")
        step = max(1, round(f * steps))
        out[step] = {"fraction": f, "step": step, "file": f"ema_{round(100 * f):03d}.pt"}
    return out


def train(cfg: dict, z_all: torch.Tensor | LatentCache, y_all: torch.Tensor, out_dir: Path,
          info: DistInfo | None = None, hflip: bool = False) -> dict:
    """Train on (z_all, y_all) and write ema.pt to out_dir (rank 0); returns the stage's facts.
    ``z_all``: normalised latents [N, C, h, w], in memory or a LatentCache (normalised on read);
    ``hflip``: draw the cache's flipped view with probability 1/2."""
    gc, seed = settings(cfg), int(cfg["seed"])
    info = info or distributed.current(cfg.get("device", "auto"))
    steps, bs, dev, accum = gc.steps, gc.batch_size, info.device, gc.grad_accum
    if bs % info.world_size:
        raise ValueError(f"generator.batch_size={bs} is the global batch and must divide evenly over "
                         f"{info.world_size} processes; use a multiple of {info.world_size}")
    if bs % (info.world_size * accum):
        raise ValueError(f"generator.batch_size={bs} must split into {info.world_size} processes x "
                         f"generator.grad_accum={accum} micro-batches; use a multiple of {info.world_size * accum}")
    torch.manual_seed(seed + 1)
    model = build_model(cfg, class_dropout_prob=0.0).to(dev).train()
    p_drop = label_dropout(cfg)
    ema = EMA(model, gc.ema_decay)
    if gc.activation_checkpointing:
        # After the EMA copy: the shadow only samples (no grad), it never needs recomputation.
        if not hasattr(model, "grad_checkpointing"):
            raise ValueError(f"generator.activation_checkpointing: generator {gc.model!r} "
                             f"({type(model).__name__}) has no grad_checkpointing switch; set it to false")
        model.grad_checkpointing = True
    if gc.compile:
        # In place and after the EMA copy (the shadow stays eager: it only averages weights), so
        # state_dict keys, checkpoints and ema.pt are those of the plain module.
        compile_in_place(model)
    # bf16 autocast on the device type (CPU or CUDA), the mixed precision DMVAE_METHOD.md names
    # for the DM stages; parameters, gradients and AdamW state stay fp32, and bf16 has fp32's
    # exponent range, so no loss scaler.
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if gc.precision == "bf16" else nullcontext
    opt = adamw(model.parameters(), dev, lr=gc.lr, betas=gc.betas, weight_decay=gc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(gc.lr_warmup_steps))
    ckpt = Checkpoint(Path(out_dir) / "ckpt.pt", gc.checkpoint_every)
    start = 0
    if (state := ckpt.load()) is not None:  # every rank loads the same file
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        start = state["step"]
    distributed.barrier()  # all ranks have read ckpt.pt before rank 0 may replace it
    net = model
    if info.distributed:
        # Buffers are fixed tables (RoPE, sin-cos): nothing to sync at each forward.
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      forward_sync_buffers=False)
    shape = tuple(z_all.shape[1:])
    snaps = snapshot_steps(gc.snapshots, steps)
    t0, recent = time.perf_counter(), []
    bar = progress(steps, "generator", start) if info.is_main else tqdm(disable=True)
    mon = TrainMonitor("generator", Path(out_dir), steps, start, unit="latents", is_main=info.is_main)
    for step in range(start, steps):
        b = draw_batch(step_generator(seed, step, dev), len(z_all), bs, shape, gc.t_sampling,
                       p_drop, hflip).part(info.rank, info.world_size)
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for i, mb in enumerate(b.micro(accum)):
            idx = mb.idx.cpu()
            z = latent_rows(z_all, idx, mb.flip).to(dev, non_blocking=True)
            y = torch.where(mb.drop, model.null_label, y_all[idx].to(dev, non_blocking=True))
            with autocast():
                v = net(interpolate(z, mb.eps, mb.t), mb.t, y)
            # Equal micro-batches: the mean of their means is the slice's mean, so the summed
            # gradients are the slice's gradient, and DDP's average over ranks the global one.
            loss = F.mse_loss(v.float(), velocity_target(z, mb.eps).float()) / accum
            # DDP all-reduces gradients in the backward of the last micro-batch only.
            sync = net.no_sync() if info.distributed and i < accum - 1 else nullcontext()
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        # The mean over ranks is the full-batch loss; checking it (not the local one) makes every
        # rank stop at the same step instead of leaving the others waiting in a collective. It is
        # checked before the optimiser step, so non-finite gradients never reach the weights.
        mean_loss = distributed.all_reduce_mean(loss_sum)
        check_finite(mean_loss, "generator", step)
        grad = torch.nn.utils.clip_grad_norm_(model.parameters(), gc.grad_clip)
        opt.step(); sched.step(); ema.update(model)
        recent = (recent + [float(mean_loss)])[-100:]
        bar.update(1)
        mon.step(step + 1, recent[-1], lr=opt.param_groups[0]["lr"], grad_norm=float(grad), items=bs)
        if info.is_main and step + 1 in snaps:
            # Written before the checkpoint of the same step: a resumed run never lacks one.
            save_torch(Path(out_dir) / snaps[step + 1]["file"],
                       {k: v.cpu() for k, v in ema.module.state_dict().items()})
        if info.is_main and ckpt.due(step + 1) and step + 1 < steps:
            ckpt.save(step + 1, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                      sched=sched.state_dict())
    bar.close()
    mon.close()
    elapsed = time.perf_counter() - t0
    if info.is_main:
        save_torch(Path(out_dir) / "ema.pt", {k: v.cpu() for k, v in ema.module.state_dict().items()})
        ckpt.remove()
    distributed.barrier()
    return {"generator_final_fm_loss": sum(recent) / max(1, len(recent)),
            "ema_snapshots": [snaps[s] for s in sorted(snaps)],
            "generator_steps_per_s": (steps - start) / max(elapsed, 1e-9),
            "generator_params": sum(p.numel() for p in model.parameters()),
            "generator_world_size": info.world_size, "generator_grad_accum": accum,
            "generator_precision": gc.precision,
            "generator_activation_checkpointing": gc.activation_checkpointing, "generator_compile": gc.compile}


def run(node: Node) -> dict:
    cfg = node.cfg
    torch.manual_seed(int(cfg["seed"]) + 1)
    cache = LatentCache(node.deps["latent_cache"].dir)
    hflip = bool(cfg["dataset"].get("hflip", False))
    facts = train(cfg, cache, cache.labels, node.dir, hflip=hflip)
    return {**facts, "generator_hflip": hflip, "generator_train_latents": len(cache)}
