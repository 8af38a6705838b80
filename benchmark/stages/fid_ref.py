"""Reference statistics: detector features of the held-out images, once per
(dataset, split, resolution, n, detector, precision); the file's content hash goes into every
result that uses it."""
from __future__ import annotations

from benchmark.dag import Node
from benchmark.metrics import build_detector, to_uint8_rgb
from benchmark.stages.common import eval_images
from benchmark.store import file_hash, save_torch


def run(node: Node) -> dict:
    ev = node.cfg["eval"]
    images = eval_images(node.cfg)
    det = build_detector(ev["detector"], ev["precision"])
    feats = det.features(to_uint8_rgb(images.images), batch_size=int(ev["batch_size"]))
    path = node.dir / "features.pt"
    save_torch(path, {"pool": feats["pool"], "logits": feats["logits"], "labels": images.labels})
    return {"n_ref": len(images), "detector": det.version, "ref_split": "test",
            "ref_features_sha256": file_hash(path)}
