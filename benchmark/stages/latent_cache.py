"""Stage latent_cache: the generator's training images encoded once by the finished tokenizer.

LightningDiT and REPA-E encode the training set once, each image and its horizontal flip, and
train the generator on the stored latents without ever running the encoder again
(/work/shared/reference/PAPER_SCALE.md, "Latent caching"). This stage does the same for the
images the generator trains on (``subset(train, generator.train_images, seed=cell seed)``, the
subset the generator encoded itself before) and writes:

- ``shard_00000.npy`` ...: raw (un-normalised) latents, float32 [n, 2, C, h, w]; view 0 is the
  image, view 1 its horizontal flip. Plain .npy so that readers memory-map them
  (``np.load(mmap_mode="r")``): at ImageNet scale the cache (1.28M x 2 x 32 x 16 x 16 float32,
  84 GB) does not fit in every rank's memory.
- ``labels.npy``: int64 [N], the class of each image.
- ``index.json``: shard files and counts, shape, dtype and the tokenizer's latent normalisation
  (latent_norm.json of the tokenizer stage, copied so that a reader needs nothing else).

Data parallel (a distributed stage): rank r encodes shards r, r + world, ...; each shard is
written atomically (benchmark/store.py), so a requeued or killed job keeps every finished shard
and encodes only the missing ones. Rank 0 writes the labels and then the index, last: a cache
without index.json is unfinished. Encoding batches start at shard boundaries and have
encode_all's size, so with a shard size that is a multiple of it the batches are exactly those
of ``encode_all`` over the whole subset (what the generator computed before this stage existed).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from benchmark import distributed
from benchmark.dag import Node, latent_shape
from benchmark.data import subset
from benchmark.settings import GeneratorSettings
from benchmark.store import read_json, write_json, write_stream

log = logging.getLogger(__name__)

INDEX = "index.json"
LABELS = "labels.npy"
FORMAT = 1
VIEWS = ("image", "hflip")
ENCODE_BATCH = 500  # tokenizers.encode_all's default batch: same batches, same floats as before
# Fault injection for tests/test_latent_cache.py: SIGKILL this process after writing this many
# shards, i.e. a kill -9 at a known point (polling for a shard file races a fast tiny encoder).
KILL_AFTER_ENV = "DMVAE_TEST_KILL_AFTER_SHARDS"


def shard_file(i: int) -> str:
    return f"shard_{i:05d}.npy"


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) rows of each shard: full shards of ``shard_size``, the last one shorter."""
    if shard_size < 1:
        raise ValueError(f"generator.cache_shard_size must be >= 1, got {shard_size}")
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


@torch.no_grad()
def encode_shard(tok, images, start: int, stop: int, device: torch.device,
                 batch_size: int = ENCODE_BATCH) -> np.ndarray:
    """float32 [n, 2, C, h, w]: the latents of rows [start, stop) (view 0) and of their
    left-right flips (view 1). Each batch is read once for both views (a file-backed set decodes
    JPEGs: no second decode for the flip), and the next batch is read in a thread while this one
    is encoded. The image view is computed as tokenizers.encode_all computes it (same batches,
    same ops), hence bit-identical to it."""
    from concurrent.futures import ThreadPoolExecutor
    batches = [(i, min(stop, i + batch_size)) for i in range(start, stop, batch_size)]
    out = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(images.float_batch, torch.arange(*batches[0])) if batches else None
        for k, (i, j) in enumerate(batches):
            x = nxt.result().to(device)
            if k + 1 < len(batches):
                nxt = pool.submit(images.float_batch, torch.arange(*batches[k + 1]))
            # [B, C, H, W]: the last axis is the width, so flip(-1) mirrors left-right
            views = [tok.encode(v).float().cpu().numpy() for v in (x, x.flip(-1))]
            if out is None:
                out = np.empty((stop - start, 2, *views[0].shape[1:]), dtype=np.float32)
            out[i - start:j - start, 0], out[i - start:j - start, 1] = views
    return out


def _valid_shard(path: Path, shape: tuple[int, ...]) -> bool:
    """A shard written by an earlier (killed) run of this stage: the file is complete by
    construction (atomic rename), so the header's shape and dtype are the whole check."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == shape and arr.dtype == np.float32


def _write_npy(path: Path, arr: np.ndarray) -> None:
    """Streamed into a temporary file and renamed (store.write_stream): no second copy in memory."""
    write_stream(path, lambda f: np.save(f, arr, allow_pickle=False))


def run(node: Node) -> dict:
    from benchmark.stages.common import dataset, load_tokenizer
    cfg = node.cfg
    gc = GeneratorSettings.from_dict(cfg["generator"], "generator")
    info = distributed.current(cfg.get("device", "auto"))
    tok, lnorm = load_tokenizer(node.deps["tokenizer"])
    tok = tok.to(info.device)
    images = subset(dataset(cfg, "train"), gc.train_images, seed=int(node.slice["seed"]))
    c, h, w = latent_shape(cfg)
    bounds = shard_bounds(len(images), gc.cache_shard_size)
    out = Path(node.dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {i for i, (s, e) in enumerate(bounds) if _valid_shard(out / shard_file(i), (e - s, 2, c, h, w))}
    distributed.barrier()  # every rank has looked before any rank writes
    if done:
        log.info("latent_cache: %d of %d shards already written (an earlier run), encoding the rest",
                 len(done), len(bounds))
    kill_after = int(os.environ.get(KILL_AFTER_ENV, 0) or 0)
    t0, encoded, written = time.perf_counter(), 0, 0
    for i in range(info.rank, len(bounds), info.world_size):
        if i in done:
            continue
        s, e = bounds[i]
        arr = encode_shard(tok, images, s, e, info.device)
        if arr.shape[1:] != (2, c, h, w):
            raise ValueError(f"latent_cache: the tokenizer gives latents {tuple(arr.shape[2:])}, the config "
                             f"says {(c, h, w)}")
        _write_npy(out / shard_file(i), arr)
        encoded += e - s
        written += 1
        log.info("latent_cache: shard %d/%d (%d images, 2 views) written", i + 1, len(bounds), e - s)
        if kill_after and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    elapsed = time.perf_counter() - t0
    distributed.barrier()  # every shard is on disk before rank 0 writes the index
    facts = {"latent_cache_images": len(images), "latent_cache_views": len(VIEWS),
             "latent_cache_shards": len(bounds), "latent_cache_shards_resumed": len(done),
             "latent_cache_world_size": info.world_size, "latent_cache_encode_s": elapsed,
             # rank 0's own rate; every rank encodes about the same share
             "latent_cache_images_per_s": 2 * encoded / max(elapsed, 1e-9)}
    if info.is_main:
        missing = [shard_file(i) for i, (s, e) in enumerate(bounds)
                   if not _valid_shard(out / shard_file(i), (e - s, 2, c, h, w))]
        if missing:
            raise RuntimeError(f"latent_cache: shards {missing[:5]} are missing or malformed after every "
                               f"rank finished; rerun the stage (finished shards are kept)")
        write_index(out, bounds, gc.cache_shard_size, images.labels, (c, h, w), lnorm, tokenizer=node.deps["tokenizer"].key)
        facts["latent_cache_bytes"] = sum((out / shard_file(i)).stat().st_size for i in range(len(bounds)))
    distributed.barrier()
    return facts


def write_index(out: Path, bounds: list[tuple[int, int]], shard_size: int, labels: torch.Tensor,
                shape: tuple[int, int, int], lnorm, tokenizer: str) -> None:
    """labels.npy, then index.json, last: its presence means the cache is complete."""
    _write_npy(out / LABELS, labels.numpy().astype(np.int64))
    write_json(out / INDEX, {
        "format": FORMAT, "n": bounds[-1][1] if bounds else 0, "views": list(VIEWS), "shape": list(shape),
        "dtype": "float32", "shard_size": shard_size, "labels": LABELS,
        "shards": [{"file": shard_file(i), "start": s, "count": e - s} for i, (s, e) in enumerate(bounds)],
        "latent_norm": {"mean": lnorm.mean, "scale": lnorm.scale}, "tokenizer": tokenizer})


class LatentCache:
    """A finished cache, memory-mapped: ``len``, ``shape`` (N, C, h, w), ``labels`` and
    ``batch(idx, flip)`` -> normalised float32 latents. Rows are read from the page cache on
    demand, so every rank of a data-parallel generator shares one copy in memory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        if not (self.dir / INDEX).exists():
            raise FileNotFoundError(f"{self.dir / INDEX} does not exist: the latent_cache stage has not finished "
                                    f"there; run it first (python -m benchmark.run_stage --stage latent_cache ...)")
        index = read_json(self.dir / INDEX)
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.dir / INDEX}: cache format {index.get('format')}, this code reads {FORMAT}")
        from tokenizers import LatentNorm
        self.index = index
        self.norm = LatentNorm(**index["latent_norm"])
        self.shards = [np.load(self.dir / s["file"], mmap_mode="r") for s in index["shards"]]
        self.starts = np.array([s["start"] for s in index["shards"]] + [index["n"]], dtype=np.int64)
        self.labels = torch.from_numpy(np.load(self.dir / index["labels"]))
        self.shape = (int(index["n"]), *map(int, index["shape"]))

    def __len__(self) -> int:
        return self.shape[0]

    def raw(self, idx: np.ndarray, view: np.ndarray) -> np.ndarray:
        """Un-normalised latents of rows ``idx`` in views ``view`` (0 image, 1 flip), in order."""
        idx, view = np.asarray(idx, dtype=np.int64), np.asarray(view, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache rows {idx.min()}..{idx.max()} outside [0, {len(self)})")
        out = np.empty((idx.size, *self.shape[1:]), dtype=np.float32)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            out[rows] = self.shards[s][idx[rows] - self.starts[s], view[rows]]
        return out

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised latents [B, C, h, w] (the tokenizer's LatentNorm, as the generator trains on);
        ``flip`` (bool [B]) picks the flipped view per row."""
        view = np.zeros(idx.shape[0], dtype=np.int64) if flip is None else flip.cpu().numpy().astype(np.int64)
        return self.norm.normalize(torch.from_numpy(self.raw(idx.cpu().numpy(), view)))


def output(node: Node) -> LatentCache:
    """What a dependant receives: the memory-mapped cache."""
    return LatentCache(node.dir)


def synthetic(out: Path, n: int, shape: tuple[int, int, int], shard_size: int, seed: int = 0) -> float:
    """A cache of random latents laid out exactly as the stage lays out a real one (for
    benchmark.perf: read throughput needs no trained tokenizer); returns the seconds it took to
    write."""
    from tokenizers import LatentNorm
    g = np.random.default_rng(seed)
    t0 = time.perf_counter()
    bounds = shard_bounds(n, shard_size)
    for i, (s, e) in enumerate(bounds):
        _write_npy(Path(out) / shard_file(i), g.standard_normal((e - s, 2, *shape), dtype=np.float32))
    write_index(Path(out), bounds, shard_size, torch.from_numpy(g.integers(0, 10, n)), shape, LatentNorm(), "synthetic")
    return time.perf_counter() - t0


def read_throughput(cache: LatentCache, batch_size: int, reps: int, seed: int = 0) -> dict:
    """Random batches as the generator draws them (uniform rows, a random view each), read
    through the memory map and normalised: MB/s of latents delivered and latents/s. The page
    cache is whatever it is (warm right after writing): this is the reader's cost, not a disk's."""
    g = torch.Generator().manual_seed(seed)
    per = int(np.prod(cache.shape[1:])) * 4
    ts = []
    for _ in range(reps):
        idx = torch.randint(len(cache), (batch_size,), generator=g)
        flip = torch.rand(batch_size, generator=g) < 0.5
        t0 = time.perf_counter()
        cache.batch(idx, flip)
        ts.append(time.perf_counter() - t0)
    med = float(np.median(ts))
    return {"batch_size": batch_size, "reps": reps, "median_batch_s": med, "latents_per_s": batch_size / med,
            "mb_per_s": batch_size * per / med / 1e6, "bytes_per_latent": per, "rows": len(cache),
            "shards": len(cache.shards)}


def perf_report(cfg: dict, out_dir: Path, quick: bool, reps: int = 20) -> dict:
    """benchmark.perf's latent-cache section: a synthetic cache of the preset's latent shape and
    shard size (up to 20,000 latents; 2,000 quick) written under ``out_dir`` and removed again,
    then random generator batches read from it."""
    import shutil
    import tempfile
    gc = GeneratorSettings.from_dict(cfg["generator"], "generator")
    n = 2000 if quick else min(gc.train_images, 20000)
    shape = latent_shape(cfg)
    tmp = Path(tempfile.mkdtemp(prefix="latent_cache_perf-", dir=out_dir))
    try:
        write_s = synthetic(tmp, n, shape, min(gc.cache_shard_size, n))
        out = read_throughput(LatentCache(tmp), gc.batch_size, reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(write_s=write_s, write_mb_per_s=n * 2 * out["bytes_per_latent"] / write_s / 1e6,
               shape=list(shape), page_cache="warm (just written)")
    log.info("latent cache: %d x 2 x %s written in %.2f s (%.0f MB/s); random batches of %d: %.0f latents/s, "
             "%.0f MB/s", n, shape, write_s, out["write_mb_per_s"], gc.batch_size, out["latents_per_s"],
             out["mb_per_s"])
    return out
