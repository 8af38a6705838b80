"""The dataset registry: ``DATASETS`` maps ``dataset.name`` to a kind that opens a split.

Third-party datasets register through the entry-point group ``dmvae_bench.datasets`` (or a
module named in ``plugins=[...]``), as priors do (benchmark/registry.py). A kind is a class
with two class methods:

- ``open(settings, split) -> ImageSet | FileImageSet``: the split ("train" or "test") as an
  object with ``len``, ``labels``, ``class_names``, ``num_classes``, ``channels``,
  ``resolution``, ``float_batch(idx)``, ``uint8_batch(idx)`` and ``select(idx)``;
- ``check(settings) -> None``: cheap checks run at config validation, before any stage
  (a missing root, a root without images, a class count that differs from the config's);
  raises ValueError naming the path.

``file_backed = True`` marks kinds whose images are decoded on demand: the tokenizer stage
then streams them through the sharded, resumable loader (benchmark/datasets/loader.py).
"""
from __future__ import annotations

from typing import Any, Protocol

from benchmark.registry import Registry


class DatasetKind(Protocol):
    file_backed: bool

    @classmethod
    def open(cls, settings: Any, split: str) -> Any: ...

    @classmethod
    def check(cls, settings: Any) -> None: ...


DATASETS: Registry[type] = Registry("dataset")


def register_dataset(name: str):
    """Class decorator: ``@register_dataset("my_set")`` on a DatasetKind."""
    return DATASETS.register(name)
