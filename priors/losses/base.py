"""Base class of matching losses: the term that pulls the encoder's latents towards p_ref.

``forward`` returns the *unweighted* loss on the latents the tokenizer produced (with graph);
the trainer multiplies by ``weight`` (lambda). ``update`` lets a loss train networks it owns
(the dm loss's fake score network) on detached latents every step, and ``tokenizer_every``
tells the trainer how often the tokenizer itself steps (the paper's alternating updates).
Being an nn.Module, a loss's state_dict holds its networks; optimisers add themselves through
``extra_state`` so that a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MatchingLoss(nn.Module):
    needs_posterior = False     # True: forward needs the encoder's (mean, logvar)
    tokenizer_every = 1

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"matching-loss weight (lambda) must be >= 0, got {weight}")
        self.weight = float(weight)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, step: int,
                posterior: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError  # abstract: every registered loss overrides it

    def update(self, z: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """Facts recorded with every result (e.g. which teacher the dm loss used)."""
        return {"loss_weight": self.weight}
