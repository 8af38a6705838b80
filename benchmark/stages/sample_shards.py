"""Sharded, resumable sampling for gen_eval: which samples a shard holds, how its noise is
seeded, how it is drawn and decoded on the device, and how shard files are written and read back.

A sample set of n is cut into fixed shards of ``eval.shard_size`` (the last one shorter). Shard i
holds samples [i * size, (i + 1) * size) with the labels of those positions in the whole set
(``balanced_labels`` is round-robin, so every 1,000-class ImageNet set of 50,000 gets 50 per
class), and all its random draws (initial noise, then the SDE's noise) come from one generator
seeded by (base seed, i). Rank r of W samples shards r, r + W, ...: which rank draws a shard
changes nothing in it, so 1 or 8 processes give the same samples, and a shard written before a
kill -9 is the one a rerun would write (it is skipped). The shard is also the sampler's batch:
the SDE's noise is drawn batch by batch, so a different batch would give other samples. For the
same reason the last shard is sampled at full size too (labels continuing the round-robin) and
only its first rows are kept: sample k is then the same in sets of any size >= k, e.g. the first
eval.n_samples of the larger domain-detector set are exactly those of a run without it.

A shard file holds its uint8 images (as decoded: [m, C, H, W]), labels, per-sample out-of-range
counts and every detector's features, written atomically (benchmark/store.py). Features are kept
in float32, which is what the networks return, so nothing is lost; rank 0 then reads only the
features back, never the images (except the first 100 for the grid and, on request, one shard at
a time into ``samples.npz``).
"""
from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from benchmark.metrics import Detector, to_uint8_rgb
from benchmark.settings import SamplerSettings
from benchmark.store import save_torch, write_stream
from generators import balanced_labels, random_labels, sample

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
NPZ_NAME = "samples.npz"


def _load(path: Path) -> dict:
    """A shard file, memory-mapped: reading its labels or features leaves the images (49 MB per
    250 samples at 256 px) on disk, so rank 0's passes over 200 shards read kilobytes, not 9.8 GB.
    weights_only as everywhere (benchmark/store.py): the files hold tensors, dicts and ints."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass(frozen=True)
class ShardPlan:
    """``n`` samples in shards of ``size``; ``name`` prefixes the shard files (``main``, ``snap025``)."""
    name: str
    n: int
    size: int

    def __post_init__(self) -> None:
        if self.n < 1 or self.size < 1:
            raise ValueError(f"shard plan {self.name!r}: n={self.n} and size={self.size} must be >= 1")

    @property
    def count(self) -> int:
        return -(-self.n // self.size)

    @property
    def padded(self) -> int:
        """Samples drawn: whole shards (the last one's extra rows are dropped)."""
        return self.count * self.size

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.size, min(self.n, (i + 1) * self.size)

    def mine(self, rank: int, world: int) -> range:
        return range(rank, self.count, world)

    def path(self, root: Path, i: int) -> Path:
        return Path(root) / SHARD_DIR / f"{self.name}_{i:05d}.pt"


def shard_seed(base: int, shard: int) -> int:
    """A 32-bit seed for shard ``shard`` of the set seeded ``base``. numpy's SeedSequence hashes
    the pair, so neighbouring (base, shard) pairs give unrelated streams (base + shard would make
    shard 1 of seed 0 the shard 0 of seed 1). 32 bits: torch's CPU generator (mt19937) uses only
    the low 32 bits of a seed."""
    if base < 0 or shard < 0:
        raise ValueError(f"shard seeds need base >= 0 and shard >= 0, got {base}, {shard}")
    return int(np.random.SeedSequence([base, shard]).generate_state(1, np.uint32)[0])


def set_labels(mode: str, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """The labels of a whole set of ``n``: balanced (n / K per class, the ADM 50 x 1000 protocol),
    or uniformly random from a generator seeded ``seed``."""
    if mode == "balanced":
        return balanced_labels(n, num_classes)
    if mode == "random":
        return random_labels(n, num_classes, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"eval.labels must be 'balanced' or 'random', got {mode!r}")


class ShardSampler:
    """Draws one shard: noise and sampler on ``device``, decoded in batches of ``decode_batch``
    (decoding is per sample, so its batch changes nothing but speed and memory), returned as
    uint8 with the decoder's channels. Holds at most one decode batch of float images and one
    shard of uint8 ones (250 x 3 x 256 x 256 = 49 MB at paper size)."""

    def __init__(self, model: torch.nn.Module, tok: torch.nn.Module, lnorm, sampler: SamplerSettings,
                 latent_shape: tuple[int, int, int], device: torch.device, decode_batch: int) -> None:
        self.model, self.tok, self.lnorm, self.sc = model, tok, lnorm, sampler
        self.shape, self.device, self.decode_batch = latent_shape, device, decode_batch

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, seed: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images [keep, C, H, W] on the CPU, out-of-range value counts [keep]): a whole
        shard sampled for ``labels``, its first ``keep`` decoded."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        y = labels.to(self.device)
        noise = torch.randn(len(y), *self.shape, generator=g, device=self.device)
        sc = self.sc
        z = sample(self.model, noise, y, steps=sc.steps, method=sc.method, cfg_scale=sc.cfg_scale,
                   cfg_interval=sc.cfg_interval, time_shift=sc.time_shift, generator=g)
        images, outside = [], []
        z = z[:keep]
        for s in range(0, len(z), self.decode_batch):
            x = self.tok.decode(self.lnorm.denormalize(z[s:s + self.decode_batch])).float()
            if not torch.isfinite(x).all():
                raise FloatingPointError("stage 'gen_eval': decoded samples contain NaN/inf")
            outside.append(((x < 0) | (x > 1)).flatten(1).sum(1).cpu())
            # to_uint8_rgb's rounding (one rule for every image the detectors see); grey images
            # keep their one channel on disk.
            images.append(to_uint8_rgb(x.clamp(0, 1))[:, :x.shape[1]].cpu())
        return torch.cat(images), torch.cat(outside)


def features(detectors: dict[str, Detector], images_u8: torch.Tensor, rows: dict[str, int],
             batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each detector's features of the first ``rows[name]`` images (none when 0), float32."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, det in detectors.items():
        m = min(rows[name], len(images_u8))
        if m <= 0:
            continue
        f = det.features(images_u8[:m], batch_size=batch_size)
        out[name] = {k: v.float() for k, v in f.items() if v is not None}
    return out


def save_shard(path: Path, start: int, labels: torch.Tensor, feats: dict, images: torch.Tensor | None = None,
               outside: torch.Tensor | None = None) -> None:
    shard = {"start": start, "labels": labels.clone(), "features": feats}
    if images is not None:
        shard.update(images=images.contiguous(), outside=outside)
    save_torch(path, shard)


def finished(plan: ShardPlan, root: Path, i: int, labels: torch.Tensor) -> bool:
    """Whether shard ``i`` is on disk for this plan. Files are written atomically, so one that
    exists is whole; its start and labels are compared anyway, so that a file left by another
    plan is redrawn rather than trusted."""
    path = plan.path(root, i)
    if not path.is_file():
        return False
    shard = _load(path)
    start, _ = plan.bounds(i)
    same = shard.get("start") == start and torch.equal(shard.get("labels"), labels)
    if not same:
        log.warning("%s does not belong to this plan (start %s): drawing it again", path, shard.get("start"))
    return same


def gather(plan: ShardPlan, root: Path, detector: str, rows: int) -> dict[str, torch.Tensor]:
    """One detector's features of the first ``rows`` samples of a plan, read shard by shard
    (rank 0, after every rank has written its shards), as float64 like Detector.features."""
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(plan.count):
        start, _ = plan.bounds(i)
        if start >= rows:
            break
        f = _load(plan.path(root, i))["features"][detector]
        for k, v in f.items():
            parts.setdefault(k, []).append(v)
    out = {k: torch.cat(v)[:rows].double() for k, v in parts.items()}
    if len(out.get("pool", ())) != rows:
        raise RuntimeError(f"{plan.name}: {detector} features of {len(out.get('pool', ()))} samples on disk, "
                           f"expected {rows}: a shard is missing")
    return out


def shard_images(plan: ShardPlan, root: Path, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) shard by shard, in order, up to ``limit`` samples."""
    limit = plan.n if limit is None else min(limit, plan.n)
    for i in range(plan.count):
        start, _ = plan.bounds(i)
        if start >= limit:
            return
        shard = _load(plan.path(root, i))
        yield shard["images"][:limit - start], shard["labels"][:limit - start]


def shard_sums(plan: ShardPlan, root: Path, key: str, rows: int) -> int:
    """Sum of a per-sample count (``outside``) over the first ``rows`` samples."""
    total = 0
    for i in range(plan.count):
        start, _ = plan.bounds(i)
        if start >= rows:
            break
        total += int(_load(plan.path(root, i))[key][:rows - start].sum())
    return total


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_npz(plan: ShardPlan, root: Path, n: int, path: Path) -> None:
    """``samples.npz`` as guided-diffusion's evaluator reads a sample batch: ``arr_0`` uint8
    [n, H, W, 3] RGB (NHWC; grey images replicated to 3 channels, as the detectors see them) and
    ``arr_1`` int64 labels, stored uncompressed (np.savez's layout). Streamed one shard at a time,
    so 50,000 x 256 x 256 x 3 (9.8 GB) never sits in memory."""
    first, _ = next(shard_images(plan, root, 1))
    h, w = first.shape[-2:]
    labels: list[torch.Tensor] = []

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as member:
                member.write(_npy_header((n, h, w, 3), np.uint8))
                for images, lab in shard_images(plan, root, n):
                    member.write(to_uint8_rgb(images).permute(0, 2, 3, 1).contiguous().numpy().tobytes())
                    labels.append(lab)
            lab = torch.cat(labels).numpy().astype(np.int64)
            with z.open("arr_1.npy", "w") as member:
                member.write(_npy_header(lab.shape, lab.dtype) + lab.tobytes())

    write_stream(path, write)
