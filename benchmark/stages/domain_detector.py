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
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from benchmark.dag import Node
from benchmark.data import ImageSet
from benchmark.metrics.domain import DomainNet, centre_crop, domain_detector
from benchmark.metrics.inception import Detector
from benchmark.settings import DomainSettings, EvalSettings
from benchmark.stages.common import dataset
from benchmark.store import load_torch, read_json, save_torch
from benchmark.training import Checkpoint, resolve_device, train_steps

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


def augment(x: torch.Tensor, side: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops of ``side`` (a translation by up to (H - side) / 2 px each way) and random
    horizontal flips of a float batch [B, C, H, W]."""
    b, _, h, w = x.shape
    oy = torch.randint(h - side + 1, (b,), generator=gen)
    ox = torch.randint(w - side + 1, (b,), generator=gen)
    ar = torch.arange(side)
    rows = (oy[:, None] + ar)[:, :, None]          # [B, side, 1]
    cols = (ox[:, None] + ar)[:, None, :]          # [B, 1, side]
    # Advanced indices split by the channel slice: numpy rules put their broadcast dims first.
    out = x[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)   # [B, C, side, side]
    if flip:
        mirror = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1)
        out = torch.where(mirror, out.flip(-1), out)
    return out.contiguous(memory_format=torch.channels_last)


def _schedule(warmup: int, steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup)) * max(0.0, 1.0 - step / steps)
    return factor


@torch.no_grad()
def accuracy(net: DomainNet, images: ImageSet, precision: str, batch_size: int = 500) -> float:
    """Top-1 accuracy on centre crops, as the detector sees images."""
    net.eval()
    correct = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for s in range(0, len(images), batch_size):
            idx = torch.arange(s, min(len(images), s + batch_size))
            x = centre_crop(images.float_batch(idx), net.side).contiguous(memory_format=torch.channels_last)
            correct += int((net(x).argmax(1) == images.labels[idx]).sum())
    return correct / len(images)


def run(node: Node) -> dict:
    ds = settings(node.cfg)
    train, test = dataset(node.cfg, "train"), dataset(node.cfg, "test")
    side = crop_side(train.resolution, ds)
    device = resolve_device(node.cfg["device"])
    # Seed before building the network: its initialisation must not depend on what the worker
    # process ran before, or reruns and resumes would differ.
    torch.manual_seed(ds.seed)
    net = DomainNet(train.channels, train.num_classes, ds.width, side, ds.feature_dim).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=ds.lr, momentum=0.9, nesterov=True, weight_decay=ds.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(ds.warmup_steps, ds.steps))
    gen = torch.Generator().manual_seed(ds.seed + 7)
    ckpt = Checkpoint(node.dir / "ckpt.pt", ds.checkpoint_every)
    autocast = ds.precision == "bf16"

    def loss_at(step: int) -> torch.Tensor:
        idx = batch_indices(len(train), ds.batch_size, step, ds.seed)
        x = augment(train.float_batch(idx), side, ds.flip, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = net(x)
        return F.cross_entropy(logits.float(), train.labels[idx].to(device))

    # No gradient clipping (clip=inf): a batch-normalised classifier under SGD does not need it.
    start, recent, elapsed = train_steps("domain_detector", net, opt, sched, gen, ckpt, ds.steps, loss_at,
                                         window=50, clip=math.inf)
    net = net.cpu().eval()
    save_torch(node.dir / WEIGHTS, {k: v.clone().contiguous() for k, v in net.state_dict().items()})
    ckpt.remove()
    acc = accuracy(net, test, ds.precision)
    log.info("domain detector: test accuracy %.4f after %d steps (%.1f s training)", acc, ds.steps, elapsed)
    return {"domain_test_accuracy": acc, "domain_n_test": len(test), "domain_train_steps": ds.steps,
            "domain_train_loss": sum(recent) / max(1, len(recent)),
            "domain_train_s": elapsed, "domain_steps_per_s": (ds.steps - start) / max(elapsed, 1e-9),
            "domain_params": sum(p.numel() for p in net.parameters()), "domain_feature_dim": net.feature_dim,
            "domain_crop": side, "domain_in_channels": net.in_channels, "domain_num_classes": net.num_classes}
