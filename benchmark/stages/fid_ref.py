"""Reference statistics: detector features of the held-out images, once per
(dataset, split, resolution, n, detectors, precision); each features file's content hash goes
into every result that uses it.

It also measures the real-vs-real floor of every metric at the counts the eval stages use:
class-balanced training images (balanced_train_images) in place of generated ones, against the
same test-split reference. A model cannot be expected to beat real images of the same
distribution, so these numbers (``floor_*``, merged into every row) say how much of an FD at
n = 500 is small-sample bias rather than model error.
"""
from __future__ import annotations

import logging

from benchmark.dag import Node
from benchmark.metrics import build_detector, generation_metrics
from benchmark.metrics.columns import fd, space_columns
from benchmark.metrics.generation import feature_statistics
from benchmark.stages import domain_detector
from benchmark.stages.common import (balanced_train_images, detector_features, domain_ref_images, eval_images,
                                     features_file, metric_slug)
from benchmark.settings import EvalSettings
from benchmark.store import file_hash, save_torch

log = logging.getLogger(__name__)

DOMAIN_FEATURES = "features_domain.pt"
FLOOR_SEED = 0  # KID subsets of the floors; the training images are balanced_train_images(seed=0)


def _device(node: Node):
    """The cell's device: the detectors run there (features come back to the CPU)."""
    from benchmark.training import resolve_device
    return resolve_device(node.cfg.get("device", "auto"))


def _inception_floor(ev: EvalSettings, node: Node, det, ref: dict) -> dict:
    """Inception metrics of eval.n_samples training images vs the n_ref test reference."""
    train = balanced_train_images(node.cfg, ev.n_samples)
    feats = detector_features(det, train, ev.batch_size)
    m = generation_metrics(feats, ref, seed=FLOOR_SEED, kid_subset_size=ev.kid_subset_size)
    return {"floor_gfid": m["fid"], "floor_kid": m["kid_mean"], "floor_precision": m["precision"],
            "floor_recall": m["recall"], "floor_n": len(train)}


def _domain(ev: EvalSettings, node: Node) -> dict:
    """The domain detector's reference features (saved) and its floors: FD/KID/P/R at
    domain.n_samples, and FD at snapshot_n_samples (the count of the EMA-snapshot curve)."""
    d = ev.domain
    det = domain_detector.detector(node.deps["domain_detector"], ev.precision).to(_device(node))
    ref_images = domain_ref_images(node.cfg)
    ref = detector_features(det, ref_images, ev.batch_size)["pool"]
    path = node.dir / DOMAIN_FEATURES
    save_torch(path, {"pool": ref, "labels": ref_images.labels})
    n_floor = max(d.n_samples, d.snapshot_n_samples)
    train = balanced_train_images(node.cfg, n_floor)
    gen = detector_features(det, train, ev.batch_size)["pool"]
    facts = {"detector_domain": det.version, "n_ref_domain": len(ref_images),
             "ref_features_sha256_domain": file_hash(path), "floor_n_domain": d.n_samples,
             "floor_n_snap_domain": d.snapshot_n_samples,
             **space_columns(gen[:d.n_samples], ref, "_domain", d.kid_subset_size, FLOOR_SEED, prefix="floor_")}
    # balanced_train_images is class-balanced at every prefix, so the snapshot floor reuses the pass.
    facts["floor_fd_snap_domain"] = fd(gen[:d.snapshot_n_samples], feature_statistics(ref))
    return facts


def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    images = eval_images(node.cfg)
    facts: dict = {"n_ref": len(images), "ref_split": "test"}
    for i, name in enumerate([ev.detector, *ev.extra_detectors]):
        det = build_detector(name, ev.precision).to(_device(node))
        feats = detector_features(det, images, ev.batch_size)  # streamed: a file-backed set is never held whole
        path = node.dir / features_file(name, primary=i == 0)
        save_torch(path, {"pool": feats["pool"], "logits": feats["logits"], "labels": images.labels})
        if i == 0:
            facts.update(detector=det.version, ref_features_sha256=file_hash(path))
            facts.update(_inception_floor(ev, node, det, feats))
        else:
            facts[f"ref_features_sha256_{metric_slug(name)}"] = file_hash(path)
    if ev.domain.enabled:
        facts.update(_domain(ev, node))
    log.info("real-vs-real floors: %s", {k: round(v, 4) for k, v in facts.items()
                                         if k.startswith("floor_") and isinstance(v, float)})
    return facts
