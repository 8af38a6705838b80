"""Priors (what the latent should look like) and matching losses (how to pull it there).

Registries: ``PRIORS`` and ``LOSSES``; names are the public API. See README "Adding a prior".
"""
from priors.registry import LOSSES, PRIORS
from priors.base import ExactTeacher, FitContext, Prior, has_exact_velocity
from priors import analytic  # noqa: F401  (registers gaussian, gmm)
from priors import features, difftraj, text, subset  # noqa: F401  (features, difftraj, text, subset)
from priors import losses  # noqa: F401  (registers dm, kl, none, ...)
from priors.losses.base import MatchingLoss

__all__ = ["PRIORS", "LOSSES", "Prior", "FitContext", "ExactTeacher", "has_exact_velocity",
           "MatchingLoss"]
