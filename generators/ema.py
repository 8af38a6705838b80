"""Exponential moving average of a model's weights (DiT / LightningDiT sample from the EMA copy,
decay 0.9999)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class EMA:
    """Keeps a frozen shadow copy; update() does shadow = decay * shadow + (1 - decay) * param.

    Floating-point parameters are averaged; buffers (and any non-float parameters) are copied,
    since averaging e.g. counters or RoPE tables is meaningless.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval()
        self.shadow.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.shadow

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, shadow_p in self.shadow.named_parameters():
            if name not in params:
                raise KeyError(f"EMA: parameter {name!r} is missing from the model being tracked")
            p = params[name].detach()
            if shadow_p.dtype.is_floating_point:
                shadow_p.lerp_(p.to(shadow_p.dtype), 1.0 - self.decay)
            else:
                shadow_p.copy_(p)
        buffers = dict(model.named_buffers())
        for name, shadow_b in self.shadow.named_buffers():
            shadow_b.copy_(buffers[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow.load_state_dict(state["shadow"])
