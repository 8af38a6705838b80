"""Helpers the stage modules share: loading upstream outputs and building cell objects."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmark.dag import Node, latent_shape
from benchmark.data import ImageSet, load_images, subset
from benchmark.settings import DatasetSettings, EvalSettings
from benchmark.store import load_torch


def dataset_settings(cfg: dict[str, Any]) -> DatasetSettings:
    return DatasetSettings.from_dict(cfg["dataset"], "dataset")


def dataset(cfg: dict[str, Any], split: str) -> ImageSet:
    d = dataset_settings(cfg)
    return load_images(d.name, split, d.resolution, d.root)


def eval_images(cfg: dict[str, Any]) -> ImageSet:
    """The fixed held-out subset used for reference statistics and rFID (same images both)."""
    return subset(dataset(cfg, "test"), EvalSettings.from_dict(cfg["eval"], "eval").n_ref, seed=0)


def build_prior(cfg: dict[str, Any], state: dict | None = None):
    from priors import PRIORS
    p = dict(cfg["prior"])
    prior = PRIORS.get(p.pop("name"))(latent_shape=latent_shape(cfg), **p)
    if state is not None:
        prior.load_state_dict(state)
    return prior


def load_prior(node: Node):
    """The prior as fitted by the cell's reference stage."""
    ref = node.deps["reference"]
    return build_prior(ref.cfg, load_torch(ref.dir / "prior.pt"))


def build_tokenizer_for(cfg: dict[str, Any]):
    from tokenizers import build_tokenizer
    from priors import LOSSES
    stochastic = bool(LOSSES.get(cfg["loss"]["name"]).needs_posterior)
    d = dataset_settings(cfg)
    return build_tokenizer(cfg["tokenizer"], d.resolution, d.channels, stochastic)


def load_tokenizer(tok_node: Node):
    from tokenizers import LatentNorm
    tok = build_tokenizer_for(tok_node.cfg)
    tok.load_state_dict(load_torch(tok_node.dir / "tokenizer.pt"))
    return tok.eval().requires_grad_(False), LatentNorm.load(tok_node.dir / "latent_norm.json")


def build_score_net(cfg: dict[str, Any]):
    from generators import build_generator
    c, h, _ = latent_shape(cfg)
    loss = cfg["loss"]
    return build_generator(loss["score_net"], input_size=h, in_channels=c,
                           num_classes=dataset_settings(cfg).num_classes, **loss.get("score_net_args", {}))


def features_file(name: str, primary: bool) -> str:
    return "features.pt" if primary else f"features_{name}.pt"


def metric_slug(detector: str) -> str:
    """mobilenet_v2-imagenet -> mobilenet_v2 (column names like fd_mobilenet_v2)."""
    return detector.split("-")[0]


def extra_fds(ev: EvalSettings | dict[str, Any], images_u8: torch.Tensor, ref_dir: Path,
              prefix: str) -> dict[str, float]:
    """Fréchet distances with the extra detectors (e.g. supervised MobileNetV2), by name."""
    from benchmark.metrics import build_detector, feature_statistics, frechet_distance
    ev = EvalSettings.from_dict(ev, "eval")
    out: dict[str, float] = {}
    for name in ev.extra_detectors:
        det = build_detector(name, ev.precision)
        f = det.features(images_u8, batch_size=ev.batch_size)["pool"]
        ref = load_torch(ref_dir / features_file(name, primary=False))["pool"]
        out[f"{prefix}_{metric_slug(name)}"] = frechet_distance(*feature_statistics(f), *feature_statistics(ref))
        out[f"{prefix}_{metric_slug(name)}_detector"] = det.version
    return out


def image_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    """Save a [N, C, H, W] batch in [0, 1] as a PNG grid (atomically)."""
    import io
    from torchvision.utils import make_grid, save_image
    from benchmark.store import write_bytes
    buf = io.BytesIO()
    save_image(make_grid(images.clamp(0, 1), nrow=nrow, padding=1), buf, format="png")
    write_bytes(path, buf.getvalue())
