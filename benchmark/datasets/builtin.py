"""The built-in dataset kinds: fashion_mnist, mnist (in memory), imagenet and folder (files).

``imagenet``: the ILSVRC-2012 class-folder layout ``<root>/train/<wnid>/*.JPEG`` and
``<root>/val/<wnid>/*.JPEG`` (PAPER_SCALE.md; the validation set re-sorted into wnid folders),
classes in sorted wnid order; the suite's ``test`` split is ``val``.
``folder``: any class-folder tree, or a flat folder as one class. With ``train/`` and ``test/``
(or ``val/``) sub-folders those are the splits; otherwise the root itself serves both splits
(logged: then the held-out statistics are not held out).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from benchmark.datasets.files import FileImageSet, class_dirs, first_image, scan
from benchmark.datasets.memory import load_digits
from benchmark.datasets.registry import register_dataset

log = logging.getLogger(__name__)


def _settings(settings: Any):
    from benchmark.settings import DatasetSettings
    return DatasetSettings.from_dict(settings, "dataset")


class _Digits:
    """Fashion-MNIST / MNIST, padded to the resolution (benchmark/datasets/memory.py)."""
    file_backed = False
    name = ""

    @classmethod
    def open(cls, settings: Any, split: str):
        d = _settings(settings)
        return load_digits(cls.name, split, d.resolution, d.root)

    @classmethod
    def check(cls, settings: Any) -> None:
        d = _settings(settings)
        if d.channels != 1:
            raise ValueError(f"dataset {cls.name} is greyscale: dataset.channels must be 1, not {d.channels}")
        if d.root is not None and not Path(d.root).is_dir():
            raise ValueError(f"dataset.root={d.root} does not exist (or is not a folder)")


@register_dataset("fashion_mnist")
class FashionMNIST(_Digits):
    name = "fashion_mnist"


@register_dataset("mnist")
class MNIST(_Digits):
    name = "mnist"


class _Files:
    """Shared logic of the file-backed kinds: find the split folder, check, open."""
    file_backed = True
    split_dir: Any  # classmethod (root, split) -> the split's folder, defined by each kind

    @classmethod
    def open(cls, settings: Any, split: str) -> FileImageSet:
        d = _settings(settings)
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        return _open(d.name, split, str(cls.split_dir(_root(d), split)), d.resolution, d.on_bad_image, d.jpeg_draft)

    @classmethod
    def check(cls, settings: Any) -> None:
        """Config validation: the root and both split folders exist and hold images, the config's
        channels and class count match the tree. Cheap: lists folders, finds one image each."""
        d = _settings(settings)
        root = _root(d)
        if d.channels != 3:
            raise ValueError(f"dataset {d.name} decodes to RGB: dataset.channels must be 3, not {d.channels}")
        for split in ("train", "test"):
            top = cls.split_dir(root, split)
            if first_image(top) is None:
                raise ValueError(f"dataset.root={root}: {top} holds no images (dataset {d.name}, split {split})")
            n = max(1, len(class_dirs(top)))
            if n != d.num_classes:
                raise ValueError(f"dataset.num_classes={d.num_classes}, but {top} holds {n} class "
                                 f"folder{'s' * (n != 1)}: set dataset.num_classes={n}")


def _root(d) -> Path:
    if d.root is None:
        raise ValueError(f"dataset {d.name} reads files: set dataset.root to the folder that holds them")
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise ValueError(f"dataset.root={root} does not exist (or is not a folder)")
    return root


@lru_cache(maxsize=16)
def _open(name: str, split: str, top: str, resolution: int, on_bad: str, draft: bool) -> FileImageSet:
    # One set (and one bad-file log) per split and settings in a process, as load_digits caches.
    return FileImageSet(name, split, scan(top), resolution, on_bad, draft)


@register_dataset("imagenet")
class ImageNet(_Files):
    @classmethod
    def split_dir(cls, root: Path, split: str) -> Path:
        top = root / {"train": "train", "test": "val"}[split]
        if not top.is_dir():
            raise ValueError(f"dataset.root={root}: no {top.name}/ folder; dataset=imagenet expects "
                             f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        return top


@register_dataset("folder")
class Folder(_Files):
    @classmethod
    def split_dir(cls, root: Path, split: str) -> Path:
        train = root / "train" if (root / "train").is_dir() else root
        if split == "train":
            return train
        for n in ("test", "val"):
            if (root / n).is_dir():
                return root / n
        log.warning("dataset.root=%s has no test/ or val/ folder: the test split is the training images", root)
        return train
