"""Peak memory of the file-backed data path at two dataset sizes (issue #14: memory per process
is bounded by batch size and worker count, never by dataset size).

Builds one folder of synthetic ImageNet-like JPEGs (benchmark/datasets/throughput.py), links
its first N files into a tree per size, and in a fresh process per size: opens it as
``dataset=folder``, runs one training epoch through the sharded loader (DataLoader workers,
the tokenizer stage's path) and one chunked ``uint8_batch`` pass over every image (the
fid_ref/recon_eval path). Reports the peak RSS of the main process and of the largest worker.

    .venv/bin/python scripts/dataset_rss.py --sizes 2000 8000 --out runs/perf/dataset_rss.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("dataset_rss")


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports kB


def measure(root: Path, workers: int, batch: int, resolution: int) -> dict:
    """One epoch through ShardedLoader and one chunked pass, in this process."""
    import torch
    from benchmark.datasets import open_dataset
    from benchmark.datasets.loader import ShardSampler, ShardedLoader
    base = _maxrss_mb(resource.RUSAGE_SELF)
    s = {"name": "folder", "resolution": resolution, "channels": 3, "num_classes": 4, "root": str(root),
         "workers": workers, "hflip": True}
    ds = open_dataset(s, "train")
    t0 = time.perf_counter()
    loader = ShardedLoader(ds, ShardSampler(len(ds), batch, seed=0, hflip=True), workers=workers)
    for _ in range(loader.sampler.steps_per_epoch):
        x, _ = loader.next()
    t_epoch = time.perf_counter() - t0
    del loader, x  # workers exit here, so RUSAGE_CHILDREN covers them
    t0 = time.perf_counter()
    for i in range(0, len(ds), 256):
        ds.uint8_batch(torch.arange(i, min(len(ds), i + 256)))
    t_pass = time.perf_counter() - t0
    return {"images": len(ds), "workers": workers, "batch": batch, "resolution": resolution,
            "rss_after_imports_mb": base, "peak_rss_main_mb": _maxrss_mb(resource.RUSAGE_SELF),
            "peak_rss_largest_worker_mb": _maxrss_mb(resource.RUSAGE_CHILDREN),
            "epoch_s": t_epoch, "epoch_img_per_s": len(ds) // batch * batch / t_epoch,
            "chunked_pass_s": t_pass, "chunked_pass_img_per_s": len(ds) / t_pass}


def link_tree(src: Path, dst: Path, n: int) -> Path:
    """``dst`` holding hard links to the first ``n`` images of ``src`` (same class folders)."""
    from benchmark.datasets.throughput import image_files
    for p in image_files(src, n):
        target = dst / Path(p).relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/dmvae_dataset_rss"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("runs/perf/dataset_rss.json"))
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode: one size
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.measure is not None:
        print(json.dumps(measure(a.measure, a.workers, a.batch, a.resolution)))  # the parent parses stdout
        return
    from benchmark.datasets.throughput import synthetic_jpegs
    from benchmark.store import write_json
    src = synthetic_jpegs(a.scratch / "all", max(a.sizes), classes=4)
    rows = []
    for n in a.sizes:
        root = link_tree(src, a.scratch / f"n{n}", n)
        # A fresh interpreter per size: ru_maxrss is a high-water mark that never goes down.
        out = subprocess.run([sys.executable, __file__, "--measure", str(root), "--workers", str(a.workers),
                              "--batch", str(a.batch), "--resolution", str(a.resolution)],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        log.info("%5d images: main peak %.0f MB (%.0f after imports), largest worker %.0f MB; "
                 "epoch %.0f img/s, chunked pass %.0f img/s", r["images"], r["peak_rss_main_mb"],
                 r["rss_after_imports_mb"], r["peak_rss_largest_worker_mb"], r["epoch_img_per_s"],
                 r["chunked_pass_img_per_s"])
    write_json(a.out, {"cases": rows})
    log.info("wrote %s", a.out)


if __name__ == "__main__":
    main()
