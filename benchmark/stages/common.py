"""Helpers the stage modules share: loading upstream outputs and building cell objects."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmark.dag import Node, latent_shape
from benchmark.data import ImageSet, class_balanced, open_dataset, subset
# sharded_batches lives with the process group: priors/features.py uses it too, and must not
# import the stages.
from benchmark.distributed import DistInfo, sharded_batches
from benchmark.settings import DatasetSettings, EvalSettings
from benchmark.store import load_torch


def dataset_settings(cfg: dict[str, Any]) -> DatasetSettings:
    return DatasetSettings.from_dict(cfg["dataset"], "dataset")


def dataset(cfg: dict[str, Any], split: str) -> ImageSet:
    """The split as an image set: in memory (digits) or decoded on demand (imagenet, folder);
    both offer uint8_batch/float_batch/select, so no stage needs the whole tensor."""
    return open_dataset(dataset_settings(cfg), split)


def eval_images(cfg: dict[str, Any]) -> ImageSet:
    """The fixed held-out subset used for reference statistics and rFID (same images both)."""
    return subset(dataset(cfg, "test"), EvalSettings.from_dict(cfg["eval"], "eval").n_ref, seed=0)


def domain_ref_images(cfg: dict[str, Any]) -> ImageSet:
    """The held-out images of the domain detector's reference features and of rfd_domain."""
    return subset(dataset(cfg, "test"), EvalSettings.from_dict(cfg["eval"], "eval").domain.n_ref, seed=0)


def balanced_train_images(cfg: dict[str, Any], n: int, seed: int = 0) -> ImageSet:
    """``n`` training images, class-balanced like the generated sets (balanced_labels), for the
    real-vs-real floors. Round-robin over classes (a random order within each class), so that
    every prefix is class-balanced too: one feature pass serves the floors at every count."""
    return class_balanced(dataset(cfg, "train"), n, seed)


def detector_features(det, images, batch_size: int, chunk: int = 1024) -> dict[str, Any]:
    """``det.features`` of every image of ``images``, decoded chunk by chunk instead of as one
    tensor (a file-backed set is never materialised). Chunks are a multiple of ``batch_size``
    rows, so the detector sees exactly the batches it would see on the whole tensor."""
    from benchmark.metrics import to_uint8_rgb
    step = max(1, chunk // batch_size) * batch_size
    parts = [det.features(to_uint8_rgb(images.uint8_batch(torch.arange(i, min(len(images), i + step)))),
                          batch_size=batch_size) for i in range(0, len(images), step)]
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}


def sharded_features(dets: dict[str, Any], images, batch_size: int, info: DistInfo,
                     what: str = "features") -> dict[str, dict[str, Any]] | None:
    """Every detector's features of every image of ``images`` (read ``batch_size`` at a time,
    so a file-backed set is never held), the batches spread over the ranks by sharded_batches.
    Rank 0 gets what ``detector_features`` returns for each detector (the same numbers: the
    same batches go through each network), the other ranks None."""
    from benchmark.metrics import to_uint8_rgb
    from benchmark.metrics.streaming import FeatureStream, batch_features
    stream = FeatureStream(dets, batch_size)

    def work(idx: torch.Tensor) -> dict:
        return batch_features(dets, to_uint8_rgb(images.uint8_batch(idx)), batch_size)

    for feats in sharded_batches(len(images), batch_size, work, info, what):
        stream.add_features(feats)
    return {name: stream.result(name) for name in dets} if info.is_main else None


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


# Written by a tokenizer stage whose architecture is not the preset's (tokenizer.design=stage1):
# the encoder/decoder sections that rebuild it, so every later stage loads what was trained.
ARCH_FILE = "tokenizer_arch.json"


def build_tokenizer_for(cfg: dict[str, Any], arch: dict[str, Any] | None = None):
    """The cell's tokenizer from its preset, or from ``arch`` (encoder, decoder, widths)."""
    from tokenizers import build_tokenizer
    from priors import LOSSES
    stochastic = bool(LOSSES.get(cfg["loss"]["name"]).needs_posterior)
    d = dataset_settings(cfg)
    return build_tokenizer(arch or cfg["tokenizer"], d.resolution, d.channels, stochastic)


def load_tokenizer(tok_node: Node):
    from benchmark.store import read_json
    from tokenizers import LatentNorm
    arch_file = tok_node.dir / ARCH_FILE
    tok = build_tokenizer_for(tok_node.cfg, read_json(arch_file) if arch_file.exists() else None)
    tok.load_state_dict(load_torch(tok_node.dir / "tokenizer.pt"))
    if tok_node.cfg["tokenizer"].get("compile"):
        # tokenizer.compile holds wherever the tokenizer runs: the latent cache, recon_eval,
        # gen_eval's decoder and difftraj's reference, as in its own stage.
        from benchmark.accel import compile_in_place
        compile_in_place(tok.encoder); compile_in_place(tok.decoder)
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


def image_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    """Save a [N, C, H, W] batch in [0, 1] as a PNG grid (atomically)."""
    import io
    from torchvision.utils import make_grid, save_image
    from benchmark.store import write_bytes
    buf = io.BytesIO()
    save_image(make_grid(images.clamp(0, 1), nrow=nrow, padding=1), buf, format="png")
    write_bytes(path, buf.getvalue())
