"""The Prior protocol: what the latent distribution should look like.

A prior is built from its config (a dict of hyperparameters) and the latent shape (C, H, W).
``fit`` may train or collect things (feature priors); analytic priors have nothing to fit.
Priors with a closed-form score on the flow-matching path expose ``velocity`` so that the dm
loss can use the exact teacher instead of training one (the choice is recorded in results).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class FitContext:
    """What a prior may need to fit itself: the dataset, a place to cache work, the outputs of
    the upstream stages it declared in ``upstream(cfg)`` (benchmark/upstream.py), by role, and
    the processes and device it runs on."""
    dataset: Any = None            # benchmark.data.ImageSet (train split) or None
    out_dir: Any = None            # pathlib.Path of the reference stage's run directory
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)      # role -> that stage's output
    input_keys: dict[str, str] = field(default_factory=dict)  # role -> that stage's run key
    # benchmark.distributed.DistInfo of the reference stage (rank, world size, device): a prior
    # may compute on the device and split its work over the ranks. None: one process on the CPU.
    dist: Any = None


@runtime_checkable
class Prior(Protocol):
    name: str
    latent_shape: tuple[int, int, int]
    class_conditional: bool

    def fit(self, ctx: FitContext) -> None: ...
    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def has_exact_velocity(prior: Any) -> bool:
    return callable(getattr(prior, "velocity", None))


class ExactTeacher(torch.nn.Module):
    """Adapts a prior's closed-form velocity to the score-network call signature (x, t, y)."""

    def __init__(self, prior: Any) -> None:
        super().__init__()
        self.prior = prior
        self.null_label = -1  # the exact field is unconditional: guidance is a no-op

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.prior.velocity(x, t)
