"""Reference statistics: detector features of the held-out images, once per
(dataset, split, resolution, n, detectors, precision); each features file's content hash goes
into every result that uses it."""
from __future__ import annotations

from benchmark.dag import Node
from benchmark.metrics import build_detector, to_uint8_rgb
from benchmark.stages.common import eval_images, features_file, metric_slug
from benchmark.settings import EvalSettings
from benchmark.store import file_hash, save_torch


def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    images = eval_images(node.cfg)
    u8 = to_uint8_rgb(images.images)
    facts: dict = {"n_ref": len(images), "ref_split": "test"}
    for i, name in enumerate([ev.detector, *ev.extra_detectors]):
        det = build_detector(name, ev.precision)
        feats = det.features(u8, batch_size=ev.batch_size)
        path = node.dir / features_file(name, primary=i == 0)
        save_torch(path, {"pool": feats["pool"], "logits": feats["logits"], "labels": images.labels})
        if i == 0:
            facts.update(detector=det.version, ref_features_sha256=file_hash(path))
        else:
            facts[f"ref_features_sha256_{metric_slug(name)}"] = file_hash(path)
    return facts
