"""Subset: a bank prior (feature or difftraj) restricted to a subset of classes.

Paper Table 1 "SubDINO": DINOv2 features of 10 ImageNet classes only. The base prior is fitted
as usual (its stage 1 sees every class) and its bank keeps only the listed classes, so the
reference covers a narrow part of the data; its samples ignore requested labels.
"""
from __future__ import annotations

from typing import Any, Sequence

from priors.features import BankPrior
from priors.registry import PRIORS


@PRIORS.register("subset")
def SubsetPrior(latent_shape: Sequence[int], base: dict[str, Any] | None = None,
                classes: Sequence[int] | None = None, label: str | None = None, **_: Any) -> BankPrior:
    if not base or "name" not in base:
        raise ValueError("subset prior needs base: {name: <feature or difftraj prior>, ...}")
    if not classes:
        raise ValueError("subset prior needs a non-empty list of classes")
    cls = PRIORS.get(base["name"])
    if not (isinstance(cls, type) and issubclass(cls, BankPrior)):
        raise ValueError(f"subset prior: base {base['name']!r} is not a bank prior "
                         f"(features, difftraj, or a plugin subclassing priors.features.BankPrior)")
    args = {k: v for k, v in base.items() if k not in ("name", "label", "classes")}
    return cls(latent_shape=latent_shape, classes=list(classes),
               label=label or f"sub-{base.get('label', base['name'])}", **args)
