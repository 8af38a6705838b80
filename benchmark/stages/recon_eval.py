"""Stage 4: reconstruction quality on the held-out split: PSNR, SSIM, and rFID against the
same held-out images' reference features (never the training set).

With the domain detector on, ``rfd_domain`` is the FD in its feature space between the
reconstructions of the domain.n_ref held-out images and those same images (fid_ref's domain
reference), as rFID is for the eval.n_ref Inception set. With eval.bootstrap > 0, every FD gets a
95% bootstrap interval over resamples of the reconstructions (``rfid_lo``, ``rfid_hi``, ...).
"""
from __future__ import annotations

import torch

from benchmark.dag import Node
from benchmark.metrics import build_detector, generation_metrics, psnr, ssim, to_uint8_rgb
from benchmark.metrics.columns import fd, fd_interval_columns
from benchmark.metrics.generation import feature_statistics
from benchmark.stages import domain_detector
from benchmark.stages.common import domain_ref_images, eval_images, extra_fds, image_grid, load_tokenizer
from benchmark.stages.fid_ref import DOMAIN_FEATURES
from benchmark.settings import EvalSettings
from benchmark.store import load_torch

BOOTSTRAP_OFFSET = 3000  # bootstrap seed = cell seed + this


def reconstruct(tok, images, batch_size: int) -> torch.Tensor:
    """Reconstructions in [0, 1] of every image of ``images``, in order."""
    out = []
    for i in range(0, len(images), batch_size):
        out.append(tok(images.float_batch(torch.arange(i, min(len(images), i + batch_size)))).clamp(0, 1))
    return torch.cat(out)


def _domain(node: Node, ev: EvalSettings, tok, seed: int) -> dict:
    images = domain_ref_images(node.cfg)
    rec = reconstruct(tok, images, ev.batch_size)
    det = domain_detector.detector(node.deps["domain_detector"], ev.precision)
    gen = det.features(to_uint8_rgb(rec), batch_size=ev.batch_size)["pool"]
    stats = feature_statistics(load_torch(node.deps["fid_ref"].dir / DOMAIN_FEATURES)["pool"])
    return {"rfd_domain": fd(gen, stats), "n_recon_domain": len(images), "detector_domain": det.version,
            **fd_interval_columns("rfd_domain", gen, stats, ev.bootstrap, seed)}


@torch.no_grad()
def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    tok, _ = load_tokenizer(node.deps["tokenizer"])
    images = eval_images(node.cfg)
    recs, ps, ss = [], [], []
    bs = ev.batch_size
    for i in range(0, len(images), bs):
        x = images.float_batch(torch.arange(i, min(len(images), i + bs)))
        r = tok(x).clamp(0, 1)
        ps.append(psnr(r, x)); ss.append(ssim(r, x)); recs.append(r)
    rec = torch.cat(recs)
    image_grid(torch.cat([images.float_batch(torch.arange(16)), rec[:16]]), 16, node.dir / "reconstructions.png")
    det = build_detector(ev.detector, ev.precision)
    u8 = to_uint8_rgb(rec)
    feats = det.features(u8, batch_size=bs)
    ref_dir = node.deps["fid_ref"].dir
    ref = load_torch(ref_dir / "features.pt")
    m = generation_metrics(feats, ref, kid_subset_size=ev.kid_subset_size)
    seed = int(node.cfg["seed"]) + BOOTSTRAP_OFFSET
    out = {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()),
           "rfid": m["fid"], "n_recon": len(images), "detector": det.version,
           **fd_interval_columns("rfid", feats["pool"], feature_statistics(ref["pool"]), ev.bootstrap, seed),
           **extra_fds(ev, u8, ref_dir, "rfd")}
    if ev.bootstrap > 0:
        out["bootstrap_replicates"] = ev.bootstrap
    if ev.domain.enabled:
        out.update(_domain(node, ev, tok, seed))
    return out
