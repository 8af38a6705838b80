"""Detector features of image sets too large to hold: read ``batch_size`` images at a time from
a dataset (in memory or file-backed: anything with ``len()`` and ``uint8_batch(idx)``,
benchmark/datasets), or from batches a caller produces (reconstructions), so that only one batch
of images and the features (16 KB per image: Inception's 2,048 values in float64) are
ever in memory. ImageNet's 50,000 validation images at 256 px are 9.8 GB as uint8 and 39 GB as
float32; their Inception features are 0.8 GB.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from benchmark.metrics.inception import Detector


def index_batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Row indices 0..n-1 in consecutive batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, n, batch_size):
        yield torch.arange(s, min(n, s + batch_size))


class FeatureStream:
    """Accumulates each detector's features batch by batch; ``result`` gives what
    ``Detector.features`` would have returned for all the images at once."""

    def __init__(self, detectors: dict[str, Detector], batch_size: int) -> None:
        self.detectors, self.batch_size = detectors, batch_size
        self.parts: dict[str, list[dict[str, torch.Tensor | None]]] = {k: [] for k in detectors}

    def add(self, images: torch.Tensor) -> None:
        """One batch of images (uint8 or float in [0, 1], any device), scored by every detector."""
        for name, det in self.detectors.items():
            self.parts[name].append(det.features(images, batch_size=self.batch_size))

    def add_features(self, feats: dict[str, dict[str, torch.Tensor | None]]) -> None:
        """One batch's features, already computed (``batch_features``, possibly on another rank
        and gathered): what ``add`` would have appended for the same images."""
        if feats.keys() != self.parts.keys():
            raise ValueError(f"features of {sorted(feats)} given to a stream of {sorted(self.parts)}")
        for name, f in feats.items():
            self.parts[name].append(f)

    def result(self, name: str) -> dict[str, torch.Tensor | None]:
        parts = self.parts[name]
        if not parts:
            raise ValueError(f"no images were scored by {name}")
        logits = [p["logits"] for p in parts]
        return {"pool": torch.cat([p["pool"] for p in parts]),
                "logits": torch.cat(logits) if all(x is not None for x in logits) else None}


def set_features(detectors: dict[str, Detector], images: Any, batch_size: int,
                 device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor | None]]:
    """Every detector's features of every image of a set, read ``batch_size`` at a time (the
    batch goes to ``device`` once for all detectors)."""
    stream = FeatureStream(detectors, batch_size)
    for idx in index_batches(len(images), batch_size):
        stream.add(images.uint8_batch(idx).to(device))
    return {name: stream.result(name) for name in detectors}


def batch_features(detectors: dict[str, Detector], images: torch.Tensor,
                   batch_size: int) -> dict[str, dict[str, torch.Tensor | None]]:
    """Every detector's features of one batch (CPU, float64), as ``FeatureStream.add`` computes
    them: for a rank that scores its batches and hands them to rank 0's stream."""
    return {name: det.features(images, batch_size=batch_size) for name, det in detectors.items()}
