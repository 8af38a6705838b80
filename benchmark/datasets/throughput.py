"""Data-path throughput: JPEG decode-and-crop per worker, and a generic read-rate hook.

``python -m benchmark.perf`` reports these beside the model cases (benchmark/perf.py), so a
sweep can be sized: a rank needs (its images per second) / (decode rate per worker) workers.
``read_throughput`` times any row reader (e.g. a latent-cache shard reader: pass a function
that returns row ``i``), in one process or in DataLoader workers, with the same accounting.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmark.datasets.decode import decode_file
from benchmark.datasets.files import is_image_name

log = logging.getLogger(__name__)

# ILSVRC-2012's typical JPEG is about 500x375 (4:3 landscape, some portrait): the synthetic set
# mimics that shape mix when no real images are at hand.
SYNTHETIC_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))


def synthetic_jpegs(folder: Path, n: int, seed: int = 0, classes: int = 1) -> Path:
    """``n`` JPEGs (quality 90) of ImageNet-like sizes with photo-like texture in ``classes``
    sub-folders of ``folder`` (an existing file is kept, so a bigger set extends a smaller one)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = folder / f"c{i % classes:03d}" / f"img{i:06d}.JPEG"
        if path.exists():
            continue
        w, h = SYNTHETIC_SIZES[i % len(SYNTHETIC_SIZES)]
        # Smooth low-frequency field + noise: compresses like a photo (~60-120 kB), not like flat colour.
        low = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        Image.fromarray(arr).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, path)  # atomic: an interrupted run leaves no half-written JPEG
    return folder


def image_files(root: Path, limit: int) -> list[str]:
    """Up to ``limit`` image paths under ``root`` (sorted walk)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_name(f)]
        if len(out) >= limit:
            break
    return out[:limit]


class _Rows(Dataset):
    def __init__(self, read: Callable[[int], Any], n: int) -> None:
        self.read, self.n = read, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.read(i)
        return i


def read_throughput(read: Callable[[int], Any], n: int, workers: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Rows per second of ``read(i)`` over rows 0..n-1: in this process (workers=0) or spread over
    ``workers`` DataLoader processes. ``per_worker`` divides by max(1, workers)."""
    t0 = time.perf_counter()
    if workers == 0:
        for i in range(n):
            read(i)
    else:
        for _ in DataLoader(_Rows(read, n), batch_size=batch_size, num_workers=workers, collate_fn=len):
            pass
    dt = time.perf_counter() - t0
    return {"rows": n, "workers": workers, "seconds": dt, "per_s": n / dt, "per_worker_per_s": n / dt / max(1, workers)}


def decode_throughput(paths: list[str], size: int = 256, draft: bool = False, workers: int = 0) -> dict[str, float]:
    """Decode-and-ADM-crop rate of ``paths`` at ``size`` px (one warm-up pass over a few files
    first, so the page cache holds them and we time the CPU, not the disk)."""
    for p in paths[:8]:
        decode_file(p, size, draft)
    res = read_throughput(lambda i: decode_file(paths[i], size, draft), len(paths), workers)
    return {**res, "size": size, "draft": draft, "mean_file_kb": float(np.mean([os.path.getsize(p) for p in paths]) / 1024)}


def data_path_report(root: Path | None, scratch: Path, quick: bool) -> dict[str, Any]:
    """The data-path figures of ``benchmark.perf``: decode-and-crop at 256 px per worker, with
    and without the DCT-scaled draft decode, on ``root``'s images or synthetic ImageNet-like JPEGs."""
    n = 24 if quick else 400
    if root is None:
        # A scratch folder beside the run directories, never the results folder the report goes to.
        import tempfile
        with tempfile.TemporaryDirectory(prefix="dmvae-jpegs-") as tmp:
            out = data_path_report(synthetic_jpegs(Path(tmp), n), scratch, quick)
        return {**out, "source": f"{n} synthetic ImageNet-like JPEGs (500x375, 375x500, 500x333, 640x480; quality 90)"}
    paths = image_files(root, n)
    if not paths:
        raise FileNotFoundError(f"{root} holds no images to time")
    torch_threads = torch.get_num_threads()
    rows = [decode_throughput(paths, 256, draft) for draft in (False, True)]
    if not quick and (os.cpu_count() or 1) >= 2:
        rows.append(decode_throughput(paths, 256, False, workers=2))
    for r in rows:
        log.info("JPEG decode + ADM crop 256 px%s, %d worker(s): %.0f img/s (%.0f per worker), %.0f kB files",
                 " (draft)" if r["draft"] else "", max(1, r["workers"]), r["per_s"], r["per_worker_per_s"],
                 r["mean_file_kb"])
    return {"source": str(root), "images": len(paths), "torch_threads": torch_threads, "decode": rows}
