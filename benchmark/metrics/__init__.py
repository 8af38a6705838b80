"""Metrics: feature detectors, generation metrics (FID/KID/PRC/IS), reconstruction (PSNR/SSIM)."""
from benchmark.metrics.generation import (
    feature_statistics,
    frechet_distance,
    generation_metrics,
    load_npz_statistics,
)
from benchmark.metrics.inception import (
    DETECTORS,
    Detector,
    build_detector,
    offline_inception_weights,
    to_uint8_rgb,
)
from benchmark.metrics.reconstruction import psnr, ssim

__all__ = [
    "DETECTORS",
    "Detector",
    "build_detector",
    "feature_statistics",
    "frechet_distance",
    "generation_metrics",
    "load_npz_statistics",
    "offline_inception_weights",
    "psnr",
    "ssim",
    "to_uint8_rgb",
]
