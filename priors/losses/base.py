"""Base class of matching losses: the term that pulls the encoder's latents towards p_ref.

``forward`` returns the *unweighted* loss on the latents the tokenizer produced (with graph);
the trainer multiplies by ``weight`` (lambda). ``update`` lets a loss train networks it owns
(the dm loss's fake score network) on detached latents every step, and ``tokenizer_every``
tells the trainer how often the tokenizer itself steps (the paper's alternating updates).
With several processes a loss whose ``update_sharded`` is True gets only this rank's rows of
the global batch and averages its networks' gradients over ranks (``average_gradients``);
the others get the gathered global batch on every rank and repeat the same step there.
Being an nn.Module, a loss's state_dict holds its networks; optimisers add themselves through
``extra_state`` so that a resumed run continues exactly.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
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


def average_gradients(params: Iterable[nn.Parameter], *scalars: torch.Tensor) -> list[torch.Tensor]:
    """Mean over ranks of the gradients of ``params`` and of ``scalars`` (e.g. the logged loss),
    in one flat all-reduce; without a process group nothing is sent and ``scalars`` come back.

    A parameter whose gradient is None on some ranks but not others would leave the flat
    buffers misaligned and the replicas diverging, so each parameter carries a "has a gradient"
    flag: where any rank has one, every rank ends with the mean (None counts as 0), and AdamW
    then steps that parameter on every rank alike."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(scalars)
    params = [p for p in params if p.requires_grad]
    if not params:
        return list(scalars)
    ref = params[0]
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device)
             for p in params]
    flat = torch.cat([has, *grads, *(s.detach().reshape(1).to(ref.dtype) for s in scalars)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    used = (flat[: len(params)] > 0).tolist()  # one device sync, not one per parameter
    i = len(params)
    for p, any_rank in zip(params, used):
        n = p.numel()
        if any_rank:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[i: i + n].view_as(p))
        i += n
    return [flat[i + j].to(s.dtype) for j, s in enumerate(scalars)]


class MatchingLoss(nn.Module):
    needs_posterior = False     # True: forward needs the encoder's (mean, logvar)
    tokenizer_every = 1
    update_in_warmup = True     # False: the loss's own networks start training with the matching phase
    # True: ``update`` takes ``rows=`` and only this rank's rows of the global batch (see
    # DistributionMatching.update); False: the gathered global batch on every rank.
    update_sharded = False

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
