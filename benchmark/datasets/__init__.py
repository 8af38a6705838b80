"""Datasets: a registry of kinds (``DATASETS``; third-party kinds through the entry-point group
``dmvae_bench.datasets``), the in-memory digit sets, the file-backed folder/ImageNet sets, row
selections that work on both, and the sharded resumable loader. See benchmark/conf/dataset/.

Every set the stages get offers ``len``, ``labels`` (int64), ``class_names``, ``num_classes``,
``channels``, ``resolution``, ``uint8_batch(idx)``, ``float_batch(idx)`` (float [0, 1] NCHW),
``select(idx)`` (an index view) and ``bad_images``; in-memory sets also ``images``.
"""
from __future__ import annotations

from typing import Any

from benchmark.datasets.registry import DATASETS, register_dataset
from benchmark.datasets.memory import FASHION_CLASSES, MNIST_CLASSES, ImageSet
from benchmark.datasets.files import FileImageSet
from benchmark.datasets.select import class_balanced, subset
from benchmark.datasets.decode import BadImageError, adm_center_crop, decode_file
from benchmark.datasets import builtin  # noqa: F401  (registers fashion_mnist, mnist, imagenet, folder)

__all__ = ["DATASETS", "register_dataset", "ImageSet", "FileImageSet", "subset", "class_balanced",
           "BadImageError", "adm_center_crop", "decode_file", "open_dataset", "check_dataset", "is_file_backed",
           "load_images", "FASHION_CLASSES", "MNIST_CLASSES"]


def _kind(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}. Third-party "
                         f"datasets register through the entry-point group '{DATASETS.group}'")
    return DATASETS.get(name)


def open_dataset(settings: Any, split: str):
    """The ``split`` ("train" | "test") of the dataset a ``dataset`` config section names."""
    from benchmark.settings import DatasetSettings
    d = DatasetSettings.from_dict(settings, "dataset")
    return _kind(d.name).open(d, split)


def check_dataset(settings: Any) -> None:
    """Config validation of the ``dataset`` section: a known name and the kind's own checks
    (root exists and holds images, ...). Raises ValueError naming the path."""
    from benchmark.settings import DatasetSettings
    d = DatasetSettings.from_dict(settings, "dataset")
    _kind(d.name).check(d)


def is_file_backed(name: str) -> bool:
    """Whether dataset ``name`` decodes files on demand (train through ShardedLoader)."""
    return bool(getattr(_kind(name), "file_backed", False))


def load_images(name: str, split: str, resolution: int = 32, root: str | None = None):
    """A split by name with default settings (the pre-registry call; cached per process)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    kind = _kind(name)
    channels = 3 if getattr(kind, "file_backed", False) else 1
    return open_dataset({"name": name, "resolution": resolution, "channels": channels, "num_classes": 0,
                         "root": root}, split)
