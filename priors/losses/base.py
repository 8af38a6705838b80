"""Base class of matching losses: the term that pulls the encoder's latents towards p_ref.

``forward`` returns the *unweighted* loss on the latents the tokenizer produced (with graph);
the trainer multiplies by ``weight`` (lambda). ``update`` lets a loss train networks it owns
(the dm loss's fake score network) on detached latents every step, and ``tokenizer_every``
tells the trainer how often the tokenizer itself steps (the paper's alternating updates).
Being an nn.Module, a loss's state_dict holds its networks; optimisers add themselves through
``extra_state`` so that a resumed run continues exactly.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn


def config_kwargs(cls: type, loss_cfg: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a ``loss`` section: ``lambda`` (the config's, the records' and
    the tables' one name for the weight; ``lambda`` is a Python keyword, so the constructors
    call it ``weight``) and the keys the class reads itself, less those another stage reads."""
    elsewhere = set(getattr(cls, "config_keys_read_elsewhere", ()))
    out = {k: v for k, v in loss_cfg.items() if k not in elsewhere and k not in ("name", "lambda")}
    if "lambda" in loss_cfg:
        out["weight"] = loss_cfg["lambda"]
    return out


class MatchingLoss(nn.Module):
    needs_posterior = False     # True: forward needs the encoder's (mean, logvar)
    tokenizer_every = 1
    update_in_warmup = True     # False: the loss's own networks start training with the matching phase

    # ---- what the runner asks of a loss class before and when it builds one

    @classmethod
    def upstream(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Stages the tokenizer stage needs for this loss, by role (benchmark.upstream.Need);
        their outputs reach ``from_config`` as ``inputs``. None by default."""
        return {}

    @classmethod
    def validate(cls, cfg: dict[str, Any]) -> None:
        """Reject a bad ``loss`` config before any stage runs (``cfg`` is the whole cell)."""
        weight = cfg["loss"].get("lambda", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss.lambda must be a finite number >= 0, got {weight!r}")

    @classmethod
    def from_config(cls, loss_cfg: dict[str, Any], *, inputs: dict[str, Any], **runner_args: Any) -> "MatchingLoss":
        """Build from the ``loss`` config (without ``name``) plus what the runner knows
        (latent_shape, num_classes, prior), passing each runner argument only to a constructor
        that takes it. ``inputs``: outputs of the stages ``upstream`` declared."""
        params = inspect.signature(cls.__init__).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        given = {k: v for k, v in runner_args.items() if takes_all or k in params}
        return cls(**config_kwargs(cls, loss_cfg), **given)

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
        return {"lambda": self.weight}
