"""The domain detector stage: train the small CNN classifier of benchmark/metrics/domain.py on
the dataset's training split, once per dataset and training settings (every cell and seed shares
it), and record its test-split accuracy. fid_ref, recon_eval and gen_eval get it as the
``domain_detector`` role and score images with its penultimate features.

Training: SGD with Nesterov momentum, linear warm-up then linear decay to 0 (short schedules
end best when the rate reaches 0), random translations (crops of side resolution - 2 * shift)
and horizontal flips. The data order is a fresh permutation per epoch, derived from (seed,
epoch), so a resumed run sees the same batches with no order state to save; the augmentation
draws come from the generator the checkpoint carries (benchmark.training.train_steps), so resume
is bit-exact.

Data parallel (torchrun / srun tasks, as the ssl_backbone and teacher stages;
benchmark/distributed.py): ``eval.domain.batch_size`` stays the global batch and must divide by
the number of processes. Every rank takes the whole global batch's indices (a pure function of
the step) and draws the whole batch's shifts and flips from the stage's generator, in the order
one process draws them, then loads and computes only its slice; DistributedDataParallel averages
the gradients. The network's batch norms must see the global batch, as one process's do: with W
ranks they are swapped for ``GlobalBatchNorm`` (same parameters and buffers, so the weights file
keeps its keys), whose training statistics are sums over all ranks, so N processes train the
weights one process trains up to the order of float sums: in float64, 2 processes match 1 to
2e-11 after 20 steps (tests/test_domain_detector_ddp.py). In float32 and bf16 a small net's
training can amplify those differences as it amplifies its own rounding (at that test's size one
float32 process and the same process in float64 end as far apart as 2 processes and 1).
The test accuracy is counted over fixed batches of 500 assigned round-robin to the ranks, so
it is one process's count for the same weights. Rank 0 alone writes checkpoints and the
weights. With one process nothing is swapped and the draws, and so the outputs, are exactly
those of the stage before it was data parallel (version 1 kept).
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from benchmark import distributed
from benchmark.accel import compile_in_place
from benchmark.dag import Node
from benchmark.data import ImageSet
from benchmark.distributed import DistInfo
from benchmark.metrics.domain import DomainNet, centre_crop, domain_detector
from benchmark.metrics.inception import Detector
from benchmark.metrics.streaming import index_batches
from benchmark.settings import DomainSettings, EvalSettings
from benchmark.stages.common import dataset
from benchmark.store import load_torch, read_json, save_torch
from benchmark.training import Checkpoint, train_steps

log = logging.getLogger(__name__)

WEIGHTS = "domain_net.pt"


def settings(cfg: dict) -> DomainSettings:
    return EvalSettings.from_dict(cfg["eval"], "eval").domain


def crop_side(resolution: int, ds: DomainSettings) -> int:
    side = resolution - 2 * ds.shift
    if side < 8:
        raise ValueError(f"eval.domain.shift={ds.shift} leaves {side}px crops of {resolution}px images; "
                         f"the network needs crops of at least 8px: use a shift of at most {(resolution - 8) // 2}")
    return side


def output(node: Node) -> DomainNet:
    """The trained classifier (eval mode, frozen), for the eval stages."""
    rec = read_json(node.record_path)["facts"]
    net = DomainNet(rec["domain_in_channels"], rec["domain_num_classes"], settings(node.cfg).width, rec["domain_crop"],
                    rec["domain_feature_dim"])
    net.load_state_dict(load_torch(node.dir / WEIGHTS))
    return net.eval().requires_grad_(False)


def detector(node: Node, precision: str) -> Detector:
    """The trained classifier's penultimate features as a Detector (uint8 RGB in, like the others)."""
    return domain_detector(output(node), precision, node.key)


@lru_cache(maxsize=1)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # 1_000_003 (prime) keeps (seed, epoch) pairs apart for any realistic epoch count.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of step ``step``: epoch-wise sampling without replacement (the last partial batch of
    each epoch is dropped), a pure function of (n, batch_size, step, seed)."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"eval.domain.batch_size={batch_size} exceeds the {n} training images")
    epoch, i = divmod(step, per_epoch)
    return _permutation(n, seed, epoch)[i * batch_size:(i + 1) * batch_size]


def augment(x: torch.Tensor, side: int, flip: bool, gen: torch.Generator, batch: int | None = None,
            part: slice = slice(None)) -> torch.Tensor:
    """Random crops of ``side`` (a translation by up to (H - side) / 2 px each way) and random
    horizontal flips of a float batch [B, C, H, W].

    ``x`` may be the rows ``part`` of a global batch of ``batch`` images (a data-parallel rank's
    slice; the whole of ``x`` by default): the draws are always the whole batch's, in one
    process's order, so ``gen`` advances alike on every rank and each row gets the shift and
    flip it gets in one process."""
    b = x.shape[0] if batch is None else batch
    h, w = x.shape[-2:]
    oy = torch.randint(h - side + 1, (b,), generator=gen)[part]
    ox = torch.randint(w - side + 1, (b,), generator=gen)[part]
    if len(oy) != x.shape[0]:
        raise ValueError(f"rows {part} of a batch of {b} are {len(oy)} images, but x has {x.shape[0]}")
    n = x.shape[0]
    ar = torch.arange(side)
    rows = (oy[:, None] + ar)[:, :, None]          # [n, side, 1]
    cols = (ox[:, None] + ar)[:, None, :]          # [n, 1, side]
    # Advanced indices split by the channel slice: numpy rules put their broadcast dims first.
    out = x[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)   # [n, C, side, side]
    if flip:
        mirror = (torch.rand(b, generator=gen)[part] < 0.5).view(n, 1, 1, 1)
        out = torch.where(mirror, out.flip(-1), out)
    return out.contiguous(memory_format=torch.channels_last)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: every rank's output is the sum of every rank's input,
    so the gradient reaching a rank's input is the sum of the gradients of every rank's output
    (the losses of all ranks depend on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """A batch norm whose training statistics are those of the global batch over all ranks, so
    each rank normalises its slice as one process normalises the whole batch, and the running
    statistics move alike on every rank. torch's SyncBatchNorm does this on accelerators only
    (CUDA, XPU, HPU), not on the CPU; this one runs on any device and backend (gloo on the CPU).
    One collective per norm carries [sum, sum of squares, count]; the sums are taken in float64,
    so the variance from them (mean of squares minus squared mean) loses nothing to cancellation
    at float32 precision. Evaluation mode is torch's own (running statistics). Used only with a
    process group: one process keeps torch's batch norms, bit for bit."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # Running statistics (or, for a norm without them, those of the batch given: in
            # evaluation every rank scores whole batches, never slices of one, see accuracy).
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xd = x.double()
        count = torch.full((1,), x.numel() / c, dtype=torch.float64, device=x.device)
        stats = _SumOverRanks.apply(torch.cat([xd.sum(dims), xd.square().sum(dims), count]))
        n = stats[-1].detach()
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean.square()).clamp_min(0)  # biased, as the normalisation uses
        if self.track_running_stats:
            # torch's update (unbiased variance; momentum None: the cumulative average), from the
            # global statistics: the same on every rank.
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.copy_(self.running_mean.double() * (1 - f) + mean * f)
                self.running_var.copy_(self.running_var.double() * (1 - f) + unbiased * f)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight.double(), shift * self.weight.double() + self.bias.double()
        shape = [1, c] + [1] * (x.dim() - 2)
        return (xd * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every batch norm in it replaced by a GlobalBatchNorm holding the same
        parameter and buffer tensors (the optimiser's parameters and the state_dict's keys stay);
        ``module`` itself when it is one."""
        if isinstance(module, _BatchNorm):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      device=module.running_mean.device if module.running_mean is not None else None)
            new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
            return new.train(module.training)
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


def _schedule(warmup: int, steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup)) * max(0.0, 1.0 - step / steps)
    return factor


@torch.no_grad()
def accuracy(net: DomainNet, images: ImageSet, precision: str, batch_size: int = 500,
             info: DistInfo | None = None) -> float:
    """Top-1 accuracy on centre crops, as the detector sees images.

    With a process group (``info``) every rank counts the batches i with i mod W == its rank
    and the counts are summed: the batches are one process's whatever W is, so the accuracy is
    one process's for the same weights (which DDP keeps equal on every rank)."""
    info = info or DistInfo()
    net.eval()
    correct = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i, idx in enumerate(index_batches(len(images), batch_size)):
            if i % info.world_size != info.rank:
                continue
            x = centre_crop(images.float_batch(idx), net.side).contiguous(memory_format=torch.channels_last)
            correct += int((net(x).argmax(1) == images.labels[idx]).sum())
    if info.distributed:
        # On the process group's device (NCCL reduces CUDA tensors only); integers: exact.
        total = torch.tensor([correct], dtype=torch.int64, device=info.device)
        dist.all_reduce(total)
        correct = int(total)
    return correct / len(images)


def run(node: Node, info: DistInfo | None = None) -> dict:
    ds = settings(node.cfg)
    # run_stage joined the launcher's group (if any); a grid worker gets one process here.
    info = info or distributed.current(node.cfg["device"])
    if ds.batch_size % info.world_size:
        # Checked before the dataset is read: every rank fails at once, before any collective.
        raise ValueError(f"eval.domain.batch_size={ds.batch_size} is the global batch and must divide evenly over "
                         f"{info.world_size} processes; use a multiple of {info.world_size}")
    train, test = dataset(node.cfg, "train"), dataset(node.cfg, "test")
    side = crop_side(train.resolution, ds)
    device = info.device
    # Seed before building the network: its initialisation must not depend on what the worker
    # process ran before, or reruns and resumes would differ (and every rank builds the same one).
    torch.manual_seed(ds.seed)
    net = DomainNet(train.channels, train.num_classes, ds.width, side, ds.feature_dim).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    if ds.compile:
        compile_in_place(net)  # in place: domain_net.pt keeps the plain keys; in no stage key
    model: nn.Module = net
    if info.distributed:
        # Before the optimiser is built (it keeps the same parameter tensors either way). Each
        # rank's batch norms would otherwise normalise by its slice's statistics, not the batch's.
        net = GlobalBatchNorm.convert(net)
        # The only buffers are the norms' running statistics, updated alike on every rank from
        # the global statistics: nothing to broadcast per forward.
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)
    opt = torch.optim.SGD(net.parameters(), lr=ds.lr, momentum=0.9, nesterov=True, weight_decay=ds.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(ds.warmup_steps, ds.steps))
    gen = torch.Generator().manual_seed(ds.seed + 7)
    ckpt = Checkpoint(node.dir / "ckpt.pt", ds.checkpoint_every)
    autocast = ds.precision == "bf16"
    per_rank = ds.batch_size // info.world_size
    part = slice(info.rank * per_rank, (info.rank + 1) * per_rank)  # this rank's rows of the global batch

    def loss_at(step: int) -> torch.Tensor:
        # Every rank takes the global batch's indices and draws its augmentation (augment draws
        # the whole batch's), so the generator the checkpoint saves is the same on every rank.
        # Images are decoded per index: loading only this rank's rows gives the batch's rows.
        idx = batch_indices(len(train), ds.batch_size, step, ds.seed)[part]
        x = augment(train.float_batch(idx), side, ds.flip, gen, ds.batch_size, part).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        # The mean over the slice; DDP averages the equal slices' gradients: the batch's mean.
        return F.cross_entropy(logits.float(), train.labels[idx].to(device))

    # No gradient clipping (clip=inf): a batch-normalised classifier under SGD does not need it.
    start, recent, elapsed = train_steps("domain_detector", net, opt, sched, gen, ckpt, ds.steps, loss_at,
                                         window=50, clip=math.inf, info=info)
    net = net.cpu().eval()
    if info.is_main:
        save_torch(node.dir / WEIGHTS, {k: v.clone().contiguous() for k, v in net.state_dict().items()})
        ckpt.remove()
    acc = accuracy(net, test, ds.precision, info=info)
    log.info("domain detector: test accuracy %.4f after %d steps (%.1f s training)", acc, ds.steps, elapsed)
    distributed.barrier()  # the other ranks return only once rank 0 has written its files
    return {"domain_test_accuracy": acc, "domain_n_test": len(test), "domain_train_steps": ds.steps,
            "domain_train_loss": sum(recent) / max(1, len(recent)),
            "domain_train_s": elapsed, "domain_steps_per_s": (ds.steps - start) / max(elapsed, 1e-9),
            "domain_params": sum(p.numel() for p in net.parameters()), "domain_feature_dim": net.feature_dim,
            "domain_crop": side, "domain_in_channels": net.in_channels, "domain_num_classes": net.num_classes}
