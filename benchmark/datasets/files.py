"""File-backed image sets: a class-folder tree (or a flat folder) decoded on demand.

Only the file index lives in memory: the relative paths as one numpy bytes array and the
labels as one int64 tensor. A numpy array, not a list of Python strings, because forked
DataLoader workers touching millions of refcounted str objects copy their pages one by one
(the known copy-on-read growth of PyTorch workers); a flat array is read without writes.

Classes are the sub-folders in sorted order, as torchvision's ImageFolder assigns them (so an
ImageNet wnid's index is its position in sorted wnid order, PAPER_SCALE.md); files are sorted
within a class, so every class occupies one contiguous run of rows. A flat folder is one class.

Bad input: files whose suffix is not an image's are skipped at the scan and counted
(``skipped``); a file that fails to decode is, with ``on_bad_image="skip"``, replaced by the next
decodable file of the same class (so the label stays right) and counted in ``bad_images``;
with ``"fail"`` it raises BadImageError naming the file.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from benchmark.datasets.decode import IMAGE_EXTENSIONS, BadImageError, decode_file

log = logging.getLogger(__name__)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".")


def class_dirs(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir() and not _hidden(e.name))


def _walk_files(top: Path) -> list[str]:
    """Every non-hidden file under ``top``, relative to it, in sorted order (deterministic)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel = os.path.relpath(dirpath, top)
        out += [f if rel == "." else os.path.join(rel, f) for f in sorted(filenames) if not _hidden(f)]
    return out


def first_image(root: Path) -> str | None:
    """Some image file under ``root`` (depth-first, stops at the first): the cheap emptiness
    check of config validation, which must not walk a 1.28M-file tree."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for f in sorted(filenames):
            if not _hidden(f) and is_image_name(f):
                return os.path.join(dirpath, f)
    return None


@dataclass(frozen=True)
class FileIndex:
    """The scan of one split folder."""
    root: Path
    files: np.ndarray              # bytes [N]: paths relative to root, grouped by class
    labels: torch.Tensor           # int64 [N]
    class_names: tuple[str, ...]
    skipped: tuple[str, ...]       # non-image files, relative to root
    class_start: np.ndarray = field(repr=False)  # int64 [K + 1]: class c is rows [start[c], start[c+1])

    def path(self, row: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[row]))


@lru_cache(maxsize=8)
def scan(root: str) -> FileIndex:
    """Index ``root``: a class-folder tree when it has sub-folders, else one flat class.
    Cached per process (a scan of ImageNet's train split is many directory reads)."""
    top = Path(root)
    if not top.is_dir():
        raise FileNotFoundError(f"dataset folder {top} does not exist (or is not a folder)")
    classes = class_dirs(top)
    if classes:
        loose = [f for f in os.listdir(top) if (top / f).is_file() and not _hidden(f)]
        if loose:
            log.warning("%s: %d files beside the class folders are not part of any class (ignored)", top, len(loose))
        groups = [(c, [os.path.join(c, f) for f in _walk_files(top / c)]) for c in classes]
    else:
        classes = [top.name]
        groups = [(top.name, [f for f in _walk_files(top)])]
    files, labels, skipped, start = [], [], [], [0]
    for label, (name, names) in enumerate(groups):
        images = [f for f in names if is_image_name(f)]
        skipped += [f for f in names if not is_image_name(f)]
        if not images:
            log.warning("%s: class %r holds no images", top, name)
        files += images
        labels += [label] * len(images)
        start.append(start[-1] + len(images))
    if not files:
        raise FileNotFoundError(f"dataset folder {top} holds no images "
                                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if skipped:
        log.warning("%s: skipped %d non-image files (e.g. %s)", top, len(skipped), skipped[0])
    log.info("indexed %s: %d images in %d classes", top, len(files), len(classes))
    return FileIndex(top, np.array([os.fsencode(f) for f in files]), torch.tensor(labels, dtype=torch.int64),
                     tuple(classes), tuple(skipped), np.array(start, dtype=np.int64))


class BadLog:
    """Rows found undecodable, shared by a set and its views (thread-safe). In DataLoader
    workers each process has its own copy; the loader reports their finds back to the parent."""

    def __init__(self) -> None:
        self.rows: set[int] = set()
        self._lock = threading.Lock()

    def add(self, rows) -> None:
        with self._lock:
            self.rows.update(int(r) for r in rows)


_POOL: ThreadPoolExecutor | None = None
_POOL_PID = -1


def _pool() -> ThreadPoolExecutor:
    # PIL releases the GIL while decoding and resampling, so threads decode in parallel. One
    # pool per process: a pool inherited through fork has no threads behind it.
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)), os.getpid()
    return _POOL


class FileImageSet:
    """A split of a folder dataset as the stages consume it (the ImageSet interface) without
    holding the images: ``uint8_batch``/``float_batch`` decode only the rows asked for.
    ``select`` gives an index view sharing the file index and the bad-file log."""

    def __init__(self, name: str, split: str, index: FileIndex, resolution: int, on_bad_image: str = "skip",
                 draft: bool = False, rows: np.ndarray | None = None, bad: BadLog | None = None) -> None:
        if on_bad_image not in ("skip", "fail"):
            raise ValueError(f"dataset.on_bad_image must be skip or fail, got {on_bad_image!r}")
        self.name, self.split, self.index = name, split, index
        self._resolution, self.on_bad_image, self.draft = int(resolution), on_bad_image, bool(draft)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.bad = bad if bad is not None else BadLog()
        self.labels = index.labels if self.rows is None else index.labels[torch.from_numpy(self.rows)]
        self.class_names = index.class_names

    def __len__(self) -> int:
        return len(self.index.files) if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return f"FileImageSet({self.name}/{self.split}: {len(self)} of {self.index.root}, {self._resolution} px)"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 3

    @property
    def resolution(self) -> int:
        return self._resolution

    @property
    def images(self):
        raise AttributeError(f"{self!r} decodes on demand and has no in-memory .images; "
                             f"use uint8_batch(idx) / float_batch(idx)")

    @property
    def bad_images(self) -> int:
        """Files skipped so far in this process: undecodable ones met plus non-image files."""
        return len(self.bad.rows) + len(self.index.skipped)

    def base_rows(self, idx) -> np.ndarray:
        """Rows of the file index behind this set's rows ``idx``."""
        idx = np.asarray(torch.as_tensor(idx, dtype=torch.int64).cpu(), dtype=np.int64).reshape(-1)
        return idx if self.rows is None else self.rows[idx]

    def select(self, idx) -> "FileImageSet":
        return FileImageSet(self.name, self.split, self.index, self._resolution, self.on_bad_image, self.draft,
                            rows=self.base_rows(idx), bad=self.bad)

    def read(self, row: int) -> tuple[np.ndarray, list[int]]:
        """uint8 HWC image of file-index row ``row`` and the rows found bad on the way. A bad
        file is replaced by the next decodable file of its class (wrapping within the class)."""
        c = int(self.index.labels[row])
        start, end = int(self.index.class_start[c]), int(self.index.class_start[c + 1])
        found: list[int] = []
        for k in range(end - start):
            r = start + (row - start + k) % (end - start)
            if r in self.bad.rows:
                continue
            try:
                img = decode_file(self.index.path(r), self._resolution, self.draft)
            except BadImageError as exc:
                if self.on_bad_image == "fail":
                    raise BadImageError(f"{exc}; set dataset.on_bad_image=skip to skip such files") from None
                log.warning("skipping %s", exc)
                found.append(r)
                self.bad.add([r])
                continue
            return img, found
        raise BadImageError(f"{self.index.root}: no decodable image left in class {self.class_names[c]!r}")

    def uint8_batch(self, idx) -> torch.Tensor:
        """uint8 [n, 3, R, R] for this set's rows ``idx``, decoded in a thread pool."""
        rows = self.base_rows(idx)
        imgs = list(_pool().map(lambda r: self.read(int(r))[0], rows)) if len(rows) > 1 \
            else [self.read(int(r))[0] for r in rows]
        if not imgs:
            return torch.empty(0, 3, self._resolution, self._resolution, dtype=torch.uint8)
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()

    def float_batch(self, idx) -> torch.Tensor:
        """Images in [0, 1] as float32 [n, 3, R, R]."""
        return self.uint8_batch(idx).float().div_(255.0)
