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
                classes: Sequence[int] | None = None, label: str | None = None,
                seed: int | None = None) -> BankPrior:
    """``seed``, when given, is the base prior's (its image subset and stage 1); else base.seed."""
    if not base or "name" not in base:
        raise ValueError("subset prior needs base: {name: <feature or difftraj prior>, ...}")
    if not classes:
        raise ValueError("subset prior needs a non-empty list of classes")
    cls = PRIORS.get(base["name"])
    if not (isinstance(cls, type) and issubclass(cls, BankPrior)):
        raise ValueError(f"subset prior: base {base['name']!r} is not a bank prior "
                         f"(features, difftraj, or a plugin subclassing priors.features.BankPrior)")
    args = {k: v for k, v in base.items() if k not in ("name", "label", "classes")}
    if seed is not None:
        args["seed"] = seed
    return cls(latent_shape=latent_shape, classes=list(classes),
               label=label or f"sub-{base.get('label', base['name'])}", **args)


def _base_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The cell config as the base prior sees it (its own section as ``prior``)."""
    base = cfg["prior"].get("base")
    if not isinstance(base, dict) or "name" not in base:
        raise ValueError("subset prior needs base: {name: <feature or difftraj prior>, ...}")
    return {**cfg, "prior": base}


def _subset_upstream(cfg: dict[str, Any]) -> dict[str, Any]:
    """The base prior's upstream stages: it is fitted as usual, then its bank is restricted."""
    from benchmark.upstream import declared
    sub = _base_cfg(cfg)
    return declared(PRIORS.get(sub["prior"]["name"]), sub)


def _subset_validate(cfg: dict[str, Any]) -> None:
    sub = _base_cfg(cfg)
    check = getattr(PRIORS.get(sub["prior"]["name"]), "validate", None)
    if callable(check):
        check(sub)


# A factory function, so the runner's hooks are attributes (a class would have classmethods).
SubsetPrior.upstream = _subset_upstream
SubsetPrior.validate = _subset_validate
