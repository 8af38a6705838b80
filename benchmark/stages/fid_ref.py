"""Reference statistics: detector features of the held-out images, once per
(dataset, split, resolution, n, detectors, precision); each features file's content hash goes
into every result that uses it.

It also measures the real-vs-real floor of every metric at the counts the eval stages use:
class-balanced training images (balanced_train_images) in place of generated ones, against the
same test-split reference. A model cannot be expected to beat real images of the same
distribution, so these numbers (``floor_*``, merged into every row) say how much of an FD at
n = 500 is small-sample bias rather than model error.

Data-parallel under torchrun / SLURM tasks, like gen_eval: each image set (the held-out
reference, the floors' training images, the domain detector's reference) is read in batches of
eval.batch_size, batch i is scored on rank i mod W on that rank's device, and the features come
back to rank 0 in the original order (distributed.sharded_batches). The batches are one process's
whatever W is, so the feature files and floors are the same on any number of ranks; rank 0
computes the floors and writes every file, the other ranks return empty facts.
"""
from __future__ import annotations

import logging

from benchmark import distributed
from benchmark.dag import Node
from benchmark.metrics import Detector, build_detector, generation_metrics
from benchmark.metrics.columns import fd, space_columns
from benchmark.metrics.generation import feature_statistics
from benchmark.stages import domain_detector
from benchmark.stages.common import (balanced_train_images, domain_ref_images, eval_images, features_file,
                                     metric_slug, sharded_features)
from benchmark.settings import EvalSettings
from benchmark.store import file_hash, save_torch

log = logging.getLogger(__name__)

DOMAIN_FEATURES = "features_domain.pt"
FLOOR_SEED = 0  # KID subsets of the floors; the training images are balanced_train_images(seed=0)
DOMAIN = "domain"


def _inception_floor(ev: EvalSettings, node: Node, det: Detector, ref: dict | None,
                     info: distributed.DistInfo) -> dict:
    """Inception metrics of eval.n_samples training images vs the n_ref test reference. Every
    rank scores its batches; rank 0 (which alone has ``ref``) returns the facts, the others {}."""
    train = balanced_train_images(node.cfg, ev.n_samples)
    feats = sharded_features({ev.detector: det}, train, ev.batch_size, info, "inception floor")
    if feats is None:
        return {}
    m = generation_metrics(feats[ev.detector], ref, seed=FLOOR_SEED, kid_subset_size=ev.kid_subset_size)
    return {"floor_gfid": m["fid"], "floor_kid": m["kid_mean"], "floor_precision": m["precision"],
            "floor_recall": m["recall"], "floor_n": len(train)}


def _domain(ev: EvalSettings, node: Node, info: distributed.DistInfo) -> dict:
    """The domain detector's reference features (saved) and its floors: FD/KID/P/R at
    domain.n_samples, and FD at snapshot_n_samples (the count of the EMA-snapshot curve).
    Every rank scores its batches; rank 0 writes and returns the facts, the others {}."""
    d = ev.domain
    dets = {DOMAIN: domain_detector.detector(node.deps["domain_detector"], ev.precision).to(info.device)}
    ref_images = domain_ref_images(node.cfg)
    ref_feats = sharded_features(dets, ref_images, ev.batch_size, info, "domain reference")
    n_floor = max(d.n_samples, d.snapshot_n_samples)
    train = balanced_train_images(node.cfg, n_floor)
    gen_feats = sharded_features(dets, train, ev.batch_size, info, "domain floor")
    if ref_feats is None or gen_feats is None:
        return {}
    ref, gen = ref_feats[DOMAIN]["pool"], gen_feats[DOMAIN]["pool"]
    path = node.dir / DOMAIN_FEATURES
    save_torch(path, {"pool": ref, "labels": ref_images.labels})
    facts = {"detector_domain": dets[DOMAIN].version, "n_ref_domain": len(ref_images),
             "ref_features_sha256_domain": file_hash(path), "floor_n_domain": d.n_samples,
             "floor_n_snap_domain": d.snapshot_n_samples,
             **space_columns(gen[:d.n_samples], ref, "_domain", d.kid_subset_size, FLOOR_SEED, prefix="floor_")}
    # balanced_train_images is class-balanced at every prefix, so the snapshot floor reuses the pass.
    facts["floor_fd_snap_domain"] = fd(gen[:d.snapshot_n_samples], feature_statistics(ref))
    return facts


def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    info = distributed.current(node.cfg.get("device", "auto"))
    images = eval_images(node.cfg)
    names = [ev.detector, *ev.extra_detectors]
    # Every detector on this rank's device, all scoring one read of the set (streamed: a
    # file-backed set is never held whole); each sees exactly the batches it would see alone.
    dets = {name: build_detector(name, ev.precision).to(info.device) for name in names}
    feats = sharded_features(dets, images, ev.batch_size, info, "reference")
    floor = _inception_floor(ev, node, dets[ev.detector], None if feats is None else feats[ev.detector], info)
    domain = _domain(ev, node, info) if ev.domain.enabled else {}
    if feats is None:  # not rank 0: its batches are scored and gathered, rank 0 writes
        return {}
    facts: dict = {"n_ref": len(images), "ref_split": "test"}
    for i, name in enumerate(names):
        path = node.dir / features_file(name, primary=i == 0)
        save_torch(path, {"pool": feats[name]["pool"], "logits": feats[name]["logits"], "labels": images.labels})
        if i == 0:
            facts.update(detector=dets[name].version, ref_features_sha256=file_hash(path))
            facts.update(floor)
        else:
            facts[f"ref_features_sha256_{metric_slug(name)}"] = file_hash(path)
    facts.update(domain)
    log.info("real-vs-real floors: %s", {k: round(v, 4) for k, v in facts.items()
                                         if k.startswith("floor_") and isinstance(v, float)})
    return facts
