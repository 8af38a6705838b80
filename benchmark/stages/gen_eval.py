"""Stage 6: sample class-balanced latents from the EMA generator, decode them with the
tokenizer (undoing the latent normalisation recorded by the tokenizer stage), and score them
with torch-fidelity metrics against the cached held-out reference features.

With the domain detector on (eval.domain), max(eval.n_samples, domain.n_samples) samples are
drawn: the first eval.n_samples exactly as without it (same labels, noise and batches, so the
Inception numbers do not move), the rest continuing the same generator with the labels that keep
the whole set class-balanced (balanced_labels is round-robin, so its first n labels are
balanced_labels(n)). Inception scores the first eval.n_samples; the domain detector scores all
of them (``fd_domain``, ``kid_domain``, ``precision_domain``, ``recall_domain``). The EMA
snapshots the generator kept (its record's ``ema_snapshots``), and the final EMA as ``snap100``,
are each scored with the domain detector on domain.snapshot_n_samples samples with the same
labels and noise (``snapNNN_fd_domain``, ``snapNNN_step``). With eval.bootstrap > 0 every FD gets
a 95% bootstrap interval over resamples of the generated set (``gfid_lo``, ``fd_domain_hi``, ...).
"""
from __future__ import annotations

import logging

import torch

from benchmark.dag import Node, latent_shape
from benchmark.metrics import Detector, build_detector, generation_metrics, to_uint8_rgb
from benchmark.metrics.columns import fd, fd_interval_columns, space_columns
from benchmark.stages import domain_detector
from benchmark.stages.common import extra_fds, image_grid, load_tokenizer
from benchmark.stages.fid_ref import DOMAIN_FEATURES
from benchmark.stages.generator import build_model
from benchmark.settings import DatasetSettings, EvalSettings
from benchmark.store import load_torch, read_json
from benchmark.metrics import feature_statistics, frechet_distance, load_npz_statistics
from generators import balanced_labels, random_labels, sample

log = logging.getLogger(__name__)

SAMPLE_OFFSET, BOOTSTRAP_OFFSET, SNAPSHOT_OFFSET = 1000, 3000, 2000  # seeds = cell seed + offset


def draw(model, tok, lnorm, cfg: dict, labels: torch.Tensor, g: torch.Generator, batch_size: int) -> torch.Tensor:
    """Decoded samples (not clamped) for ``labels``, in batches of ``batch_size``; each batch's
    noise, then its sampler draws, come from ``g``."""
    sc = EvalSettings.from_dict(cfg["eval"], "eval").sampler
    shape = latent_shape(cfg)
    imgs = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size]
        noise = torch.randn(len(y), *shape, generator=g)
        z = sample(model, noise, y, steps=sc.steps, method=sc.method, cfg_scale=sc.cfg_scale,
                   cfg_interval=sc.cfg_interval, time_shift=sc.time_shift, generator=g)
        imgs.append(tok.decode(lnorm.denormalize(z)))
    x = torch.cat(imgs)
    if not torch.isfinite(x).all():
        raise FloatingPointError("stage 'gen_eval': decoded samples contain NaN/inf")
    return x


def _labels(mode: str, n: int, ncls: int, g: torch.Generator) -> torch.Tensor:
    if mode == "balanced":
        return balanced_labels(n, ncls)   # n / K per class, as the ADM 50 x 1000 protocol
    if mode == "random":
        return random_labels(n, ncls, generator=g)
    raise ValueError(f"eval.labels must be 'balanced' or 'random', got {mode!r}")


def snapshot_entries(gen_node: Node) -> list[dict]:
    """The generator's EMA snapshots in training order, then the final EMA (ema.pt) as fraction
    1; empty when the generator kept none."""
    snaps = list(read_json(gen_node.record_path)["facts"].get("ema_snapshots") or [])
    if not snaps:
        return []
    snaps.sort(key=lambda e: float(e["fraction"]))
    if all(round(100 * float(e["fraction"])) != 100 for e in snaps):
        snaps.append({"fraction": 1.0, "step": int(gen_node.cfg["generator"]["steps"]), "file": "ema.pt"})
    return snaps


def _snapshots(node: Node, ev: EvalSettings, model, tok, lnorm, det, ref_stats, ncls: int) -> dict:
    """FD in the domain space of every EMA snapshot, on the same labels and noise."""
    entries = snapshot_entries(node.deps["generator"])
    seed = int(node.cfg["seed"]) + SNAPSHOT_OFFSET
    n = ev.domain.snapshot_n_samples
    labels = _labels(ev.label_mode, n, ncls, torch.Generator().manual_seed(seed + 1))
    out: dict = {}
    for e in entries:
        model.load_state_dict(load_torch(node.deps["generator"].dir / e["file"]))
        x = draw(model, tok, lnorm, node.cfg, labels, torch.Generator().manual_seed(seed), ev.batch_size)
        f = det.features(to_uint8_rgb(x.clamp(0, 1)), batch_size=ev.batch_size)["pool"]
        pct = f"snap{round(100 * float(e['fraction'])):03d}"
        out[f"{pct}_fd_domain"], out[f"{pct}_step"] = fd(f, ref_stats), int(e["step"])
        log.info("EMA snapshot %s (step %d): fd_domain %.4g", e["file"], e["step"], out[f"{pct}_fd_domain"])
    if out:
        out["snapshot_n_samples"] = n
    return out


def _domain(node: Node, ev: EvalSettings, x: torch.Tensor, seed: int) -> tuple[dict, Detector, tuple]:
    """Domain-space metrics of every sample, plus the detector and reference statistics for the
    snapshots."""
    det = domain_detector.detector(node.deps["domain_detector"], ev.precision)
    ref = load_torch(node.deps["fid_ref"].dir / DOMAIN_FEATURES)["pool"]
    gen = det.features(to_uint8_rgb(x), batch_size=ev.batch_size)["pool"]
    stats = feature_statistics(ref)
    return {**space_columns(gen, ref, "_domain", ev.domain.kid_subset_size, seed),
            **fd_interval_columns("fd_domain", gen, stats, ev.bootstrap, seed + BOOTSTRAP_OFFSET),
            "n_samples_domain": len(gen), "detector_domain": det.version}, det, stats


@torch.no_grad()
def run(node: Node) -> dict:
    cfg = node.cfg
    ev = EvalSettings.from_dict(cfg["eval"], "eval")
    sc = ev.sampler
    tok, lnorm = load_tokenizer(node.deps["tokenizer"])
    model = build_model(cfg)
    model.load_state_dict(load_torch(node.deps["generator"].dir / "ema.pt"))
    model.eval()
    n, ncls = ev.n_samples, DatasetSettings.from_dict(cfg["dataset"], "dataset").num_classes
    seed = int(cfg["seed"])
    g = torch.Generator().manual_seed(seed + SAMPLE_OFFSET)
    label_mode = ev.label_mode
    labels = _labels(label_mode, n, ncls, g)
    x = draw(model, tok, lnorm, cfg, labels, g, ev.batch_size)
    out_of_range = float(((x < 0) | (x > 1)).float().mean())
    x = x.clamp(0, 1)
    order = torch.argsort(labels[:100], stable=True)
    image_grid(x[:100][order], 10, node.dir / "samples.png")
    det = build_detector(ev.detector, ev.precision)
    u8 = to_uint8_rgb(x)
    feats = det.features(u8, batch_size=ev.batch_size)
    ref_dir = node.deps["fid_ref"].dir
    ref = load_torch(ref_dir / "features.pt")
    m = generation_metrics(feats, ref, seed=seed, kid_subset_size=ev.kid_subset_size)
    extra: dict = fd_interval_columns("gfid", feats["pool"], feature_statistics(ref["pool"]), ev.bootstrap,
                                      seed + BOOTSTRAP_OFFSET)
    if ev.bootstrap > 0:
        extra["bootstrap_replicates"] = ev.bootstrap
    if ev.ref_npz:
        # Published statistics (e.g. ADM's ImageNet-256 VIRTUAL_imagenet256_labeled.npz), so that
        # paper-scale gFID is computed against the same reference as the literature.
        mu_r, sig_r = load_npz_statistics(ev.ref_npz)
        extra["gfid_ref_npz"] = frechet_distance(*feature_statistics(feats["pool"]), mu_r, sig_r)
        extra["ref_npz"] = ev.ref_npz
    if ev.domain.enabled:
        n_dom = max(n, ev.domain.n_samples)
        if n_dom > n:
            # Continue the same generator: the first n samples above are untouched.
            more = (balanced_labels(n_dom, ncls)[n:] if label_mode == "balanced"
                    else _labels(label_mode, n_dom - n, ncls, g))
            x = torch.cat([x, draw(model, tok, lnorm, cfg, more, g, ev.batch_size).clamp(0, 1)])
        dom, ddet, dstats = _domain(node, ev, x, seed)
        extra.update(dom)
        extra.update(_snapshots(node, ev, model, tok, lnorm, ddet, dstats, ncls))
    return {**extra, "gfid": m["fid"], "kid": m["kid_mean"], "kid_std": m["kid_std"],
            "precision": m["precision"], "recall": m["recall"], "is": m["is_mean"],
            "n_samples": n, "label_sampling": label_mode, "sampler": sc.method,
            "sampler_steps": sc.steps, "cfg_scale": sc.cfg_scale,
            "sample_seed": seed + SAMPLE_OFFSET, "decoded_out_of_range_frac": out_of_range,
            "detector": det.version, **extra_fds(ev, u8, ref_dir, "fd")}
