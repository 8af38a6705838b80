"""Stage 4: reconstruction quality on the held-out split: PSNR, SSIM, and rFID against the
same held-out images' reference features (never the training set).

With the domain detector on, ``rfd_domain`` is the FD in its feature space between the
reconstructions of the domain.n_ref held-out images and those same images (fid_ref's domain
reference), as rFID is for the eval.n_ref Inception set. With eval.bootstrap > 0, every FD gets a
95% bootstrap interval over resamples of the reconstructions (``rfid_lo``, ``rfid_hi``, ...).

It runs on the cell's device (``device``) and streams: each batch of held-out images is read from
the set, reconstructed, scored by PSNR/SSIM and every detector, and dropped, so 50,000 ImageNet
validation images never sit in memory (only their features do).

Data-parallel under torchrun / SLURM tasks, like gen_eval: batch i of eval.batch_size images is
reconstructed and scored on rank i mod W, on that rank's device, and its features, per-image
PSNR/SSIM and (for the first GRID images) reconstructions come back to rank 0 in the original
order (distributed.sharded_batches). The batches are one process's whatever W is, so every number is
the same on any number of ranks; rank 0 computes the metrics and writes every file, the other
ranks return empty facts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmark import distributed
from benchmark.dag import Node
from benchmark.metrics import Detector, build_detector, generation_metrics, psnr, ssim
from benchmark.metrics.columns import fd, fd_interval_columns, named_fds
from benchmark.metrics.generation import feature_statistics
from benchmark.metrics.streaming import FeatureStream, batch_features
from benchmark.stages import domain_detector
from benchmark.stages.common import domain_ref_images, eval_images, features_file, image_grid, load_tokenizer
from benchmark.stages.fid_ref import DOMAIN_FEATURES
from benchmark.settings import EvalSettings
from benchmark.store import load_torch

BOOTSTRAP_OFFSET = 3000  # bootstrap seed = cell seed + this
GRID = 16  # images (and their reconstructions) in reconstructions.png


@dataclass
class Scored:
    """Rank 0's view of a reconstruction pass: every image's features, PSNR and SSIM, in order."""
    stream: FeatureStream
    psnr: torch.Tensor
    ssim: torch.Tensor
    first: torch.Tensor  # the first ``keep`` reconstructions, [keep, C, H, W] on the CPU


def reconstruct_scored(tok, images, dets: dict[str, Detector], batch_size: int, info: distributed.DistInfo,
                       keep: int = 0, what: str = "reconstructions") -> Scored | None:
    """Reconstruct every image of ``images`` ``batch_size`` at a time (read from the set batch by
    batch, so a file-backed set of 50,000 is never held), each batch on the rank that
    distributed.sharded_batches gives it, on that rank's device, scored with every detector as it
    goes.
    Rank 0 gets the features, per-image PSNR and SSIM, and the first ``keep`` reconstructions;
    the other ranks None. No other reconstruction outlives its batch."""
    device = info.device

    def work(idx: torch.Tensor) -> dict:
        x = images.float_batch(idx).to(device)
        r = tok(x).clamp(0, 1)
        start = int(idx[0])
        # clone: a slice of the batch would carry the whole batch's storage on its way to rank 0.
        kept = r[:keep - start].cpu().clone() if start < keep else None
        return {"psnr": psnr(r, x).cpu(), "ssim": ssim(r, x).cpu(), "features": batch_features(dets, r, batch_size),
                "first": kept}

    stream = FeatureStream(dets, batch_size)
    ps, ss, first = [], [], []
    for out in distributed.sharded_batches(len(images), batch_size, work, info, what):
        ps.append(out["psnr"])
        ss.append(out["ssim"])
        stream.add_features(out["features"])
        if out["first"] is not None:
            first.append(out["first"])
    if not info.is_main:
        return None
    return Scored(stream, torch.cat(ps), torch.cat(ss), torch.cat(first) if first else torch.empty(0))


def _domain_pass(node: Node, ev: EvalSettings, tok, info: distributed.DistInfo) -> tuple[Scored | None, str]:
    """Every rank: its batches of the domain reference images, reconstructed and scored by the
    domain detector. Returns rank 0's Scored (None elsewhere) and the detector's version."""
    images = domain_ref_images(node.cfg)
    det = domain_detector.detector(node.deps["domain_detector"], ev.precision).to(info.device)
    scored = reconstruct_scored(tok, images, {"domain": det}, ev.batch_size, info, what="domain reconstructions")
    return scored, det.version


def _domain_columns(node: Node, ev: EvalSettings, scored: Scored, version: str, seed: int) -> dict:
    gen = scored.stream.result("domain")["pool"]
    stats = feature_statistics(load_torch(node.deps["fid_ref"].dir / DOMAIN_FEATURES)["pool"])
    return {"rfd_domain": fd(gen, stats), "n_recon_domain": len(gen), "detector_domain": version,
            **fd_interval_columns("rfd_domain", gen, stats, ev.bootstrap, seed)}


@torch.no_grad()
def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    info = distributed.current(node.cfg.get("device", "auto"))
    device = info.device
    tok, _ = load_tokenizer(node.deps["tokenizer"])
    tok = tok.to(device)
    images = eval_images(node.cfg)
    bs = ev.batch_size
    dets = {name: build_detector(name, ev.precision).to(device) for name in (ev.detector, *ev.extra_detectors)}
    # Every rank takes part in every pass (each gather is a collective); rank 0 alone scores.
    main = reconstruct_scored(tok, images, dets, bs, info, keep=GRID)
    domain = _domain_pass(node, ev, tok, info) if ev.domain.enabled else None
    if main is None:
        return {}
    stream, first = main.stream, main.first
    image_grid(torch.cat([images.float_batch(torch.arange(len(first))), first]), GRID,
               node.dir / "reconstructions.png")
    feats = stream.result(ev.detector)
    ref_dir = node.deps["fid_ref"].dir
    ref = load_torch(ref_dir / "features.pt")
    m = generation_metrics(feats, ref, kid_subset_size=ev.kid_subset_size, device=device)
    seed = int(node.cfg["seed"]) + BOOTSTRAP_OFFSET
    extra = ev.extra_detectors
    out = {"psnr": float(main.psnr.mean()), "ssim": float(main.ssim.mean()),
           "rfid": m["fid"], "n_recon": len(images), "detector": dets[ev.detector].version,
           **fd_interval_columns("rfid", feats["pool"], feature_statistics(ref["pool"]), ev.bootstrap, seed),
           **named_fds("rfd", {k: stream.result(k)["pool"] for k in extra},
                       {k: load_torch(ref_dir / features_file(k, primary=False))["pool"] for k in extra},
                       {k: dets[k].version for k in extra})}
    if ev.bootstrap > 0:
        out["bootstrap_replicates"] = ev.bootstrap
    if domain is not None:
        out.update(_domain_columns(node, ev, *domain, seed))
    return out
