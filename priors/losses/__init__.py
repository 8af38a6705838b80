"""Matching losses; importing this package registers the built-in ones."""
from priors.losses import adversarial, align, dm, mmd, simple, swd  # noqa: F401  (registration side effects)
from priors.losses.base import MatchingLoss

__all__ = ["MatchingLoss"]
