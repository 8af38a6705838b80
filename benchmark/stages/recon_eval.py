"""Stage 4: reconstruction quality on the held-out split: PSNR, SSIM, and rFID against the
same held-out images' reference features (never the training set).

With the domain detector on, ``rfd_domain`` is the FD in its feature space between the
reconstructions of the domain.n_ref held-out images and those same images (fid_ref's domain
reference), as rFID is for the eval.n_ref Inception set. With eval.bootstrap > 0, every FD gets a
95% bootstrap interval over resamples of the reconstructions (``rfid_lo``, ``rfid_hi``, ...).

It runs on the cell's device (``device``) and streams: each batch of held-out images is read from
the set, reconstructed, scored by PSNR/SSIM and every detector, and dropped, so 50,000 ImageNet
validation images never sit in memory (only their features do).
"""
from __future__ import annotations

import torch

from benchmark.dag import Node
from benchmark.metrics import Detector, build_detector, generation_metrics, psnr, ssim
from benchmark.metrics.columns import fd, fd_interval_columns, named_fds
from benchmark.metrics.generation import feature_statistics
from benchmark.metrics.streaming import FeatureStream, index_batches
from benchmark.stages import domain_detector
from benchmark.stages.common import domain_ref_images, eval_images, features_file, image_grid, load_tokenizer
from benchmark.stages.fid_ref import DOMAIN_FEATURES
from benchmark.settings import EvalSettings
from benchmark.store import load_torch
from benchmark.training import resolve_device

BOOTSTRAP_OFFSET = 3000  # bootstrap seed = cell seed + this
GRID = 16  # images (and their reconstructions) in reconstructions.png


def reconstruct_scored(tok, images, dets: dict[str, Detector], batch_size: int, device: torch.device,
                       keep: int = 0) -> tuple[FeatureStream, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruct every image of ``images`` on ``device``, ``batch_size`` at a time (read from
    the set batch by batch, so a file-backed set of 50,000 is never held), scoring each batch
    with every detector as it goes. Returns the features, per-image PSNR and SSIM, and the first
    ``keep`` reconstructions; no other reconstruction outlives its batch."""
    stream = FeatureStream(dets, batch_size)
    ps, ss, first = [], [], []
    for idx in index_batches(len(images), batch_size):
        x = images.float_batch(idx).to(device)
        r = tok(x).clamp(0, 1)
        ps.append(psnr(r, x).cpu())
        ss.append(ssim(r, x).cpu())
        stream.add(r)
        if sum(len(f) for f in first) < keep:
            first.append(r[:keep].cpu())
    kept = torch.cat(first)[:keep] if first else torch.empty(0)
    return stream, torch.cat(ps), torch.cat(ss), kept


def _domain(node: Node, ev: EvalSettings, tok, seed: int, device: torch.device) -> dict:
    images = domain_ref_images(node.cfg)
    det = domain_detector.detector(node.deps["domain_detector"], ev.precision).to(device)
    stream, _, _, _ = reconstruct_scored(tok, images, {"domain": det}, ev.batch_size, device)
    gen = stream.result("domain")["pool"]
    stats = feature_statistics(load_torch(node.deps["fid_ref"].dir / DOMAIN_FEATURES)["pool"])
    return {"rfd_domain": fd(gen, stats), "n_recon_domain": len(images), "detector_domain": det.version,
            **fd_interval_columns("rfd_domain", gen, stats, ev.bootstrap, seed)}


@torch.no_grad()
def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    device = resolve_device(node.cfg.get("device", "auto"))
    tok, _ = load_tokenizer(node.deps["tokenizer"])
    tok = tok.to(device)
    images = eval_images(node.cfg)
    bs = ev.batch_size
    dets = {name: build_detector(name, ev.precision).to(device) for name in (ev.detector, *ev.extra_detectors)}
    stream, ps, ss, first = reconstruct_scored(tok, images, dets, bs, device, keep=GRID)
    image_grid(torch.cat([images.float_batch(torch.arange(len(first))), first]), GRID,
               node.dir / "reconstructions.png")
    feats = stream.result(ev.detector)
    ref_dir = node.deps["fid_ref"].dir
    ref = load_torch(ref_dir / "features.pt")
    m = generation_metrics(feats, ref, kid_subset_size=ev.kid_subset_size, device=device)
    seed = int(node.cfg["seed"]) + BOOTSTRAP_OFFSET
    extra = ev.extra_detectors
    out = {"psnr": float(ps.mean()), "ssim": float(ss.mean()),
           "rfid": m["fid"], "n_recon": len(images), "detector": dets[ev.detector].version,
           **fd_interval_columns("rfid", feats["pool"], feature_statistics(ref["pool"]), ev.bootstrap, seed),
           **named_fds("rfd", {k: stream.result(k)["pool"] for k in extra},
                       {k: load_torch(ref_dir / features_file(k, primary=False))["pool"] for k in extra},
                       {k: dets[k].version for k in extra})}
    if ev.bootstrap > 0:
        out["bootstrap_replicates"] = ev.bootstrap
    if ev.domain.enabled:
        out.update(_domain(node, ev, tok, seed, device))
    return out
