"""Shared pieces of every training stage: checkpoints that resume exactly, schedules, checks.

A checkpoint holds the model(s), optimiser(s), the step, torch's global RNG and the stage's
data-order generator, so a stage killed at any point continues with no lost or repeated steps.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmark import distributed
from benchmark.distributed import DistInfo
from benchmark.store import load_torch, save_torch

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf; the message names the stage and the step."""


def check_finite(value: torch.Tensor, stage: str, step: int, what: str = "loss") -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteLossError(f"stage {stage!r}: {what} is {float(value.detach())} at step {step}; "
                                 f"lower the learning rate or the matching weight, or check the inputs")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_lambda(warmup_steps: int):
    """Linear warm-up then constant, the schedule of the DMVAE and LightningDiT recipes."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
    # Bars only on an interactive terminal; CI logs get the per-stage lines instead.
    quiet = bool(os.environ.get("CI") or os.environ.get("DMVAE_NO_BARS")) or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, initial=initial, disable=quiet, leave=False, dynamic_ncols=True)


class Checkpoint:
    """``path=None`` checkpoints nothing: the caller has no run directory (a prior fitted in a
    test or a notebook), and the training loop stays the same code either way."""

    def __init__(self, path: Path | None, every: int) -> None:
        self.path = None if path is None else Path(path)
        self.every = max(1, int(every))

    def load(self, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The saved state (torch's RNG restored), or None. ``extra`` must equal what was saved
        with the checkpoint (a fingerprint of inputs the caller recomputes, e.g. features),
        else the checkpoint belongs to other inputs and is ignored: resuming on them would not
        be bit-exact, so the stage starts over."""
        if self.path is None or not self.path.exists():
            return None
        state = load_torch(self.path)
        if state.get("extra", {}) != (extra or {}):
            log.warning("%s was written for other inputs (%s, now %s); starting over", self.path,
                        state.get("extra"), extra)
            return None
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            # Every device's generator (torch.randn(..., device="cuda") in the training loops
            # draws from them), so a resumed run on the GPU continues the same streams.
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        log.info("resuming from %s at step %d", self.path, state["step"])
        return state

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, **state: Any) -> None:
        if self.path is not None:
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            save_torch(self.path, {"step": step, "torch_rng": torch.get_rng_state(), "cuda_rng": cuda, **state})

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class PlateauStop:
    """Stop a training loop once a held-out loss stops improving: every ``eval_every`` steps
    ``evaluate()`` is called; training stops after ``patience`` evaluations in a row that did not
    beat the best by a relative ``min_rel_improvement``. The curve of (step, loss) is kept, and it
    and the counters travel in checkpoints (``state_dict``) so a resumed stage stops where an
    uninterrupted one would."""

    def __init__(self, evaluate, eval_every: int = 100, patience: int = 3,
                 min_rel_improvement: float = 0.01, min_steps: int = 0, decays: int = 0,
                 decay_factor: float = 0.3, on_decay=None) -> None:
        if eval_every < 1 or patience < 1:
            raise ValueError(f"plateau rule needs eval_every >= 1 and patience >= 1, got {eval_every}, {patience}")
        if decays < 0 or not 0 < decay_factor < 1:
            raise ValueError(f"plateau rule needs decays >= 0 and 0 < decay_factor < 1, got {decays}, {decay_factor}")
        self.evaluate, self.every, self.patience = evaluate, int(eval_every), int(patience)
        self.tol, self.min_steps = float(min_rel_improvement), int(min_steps)
        # decays: at the first plateaus the learning rate is multiplied by decay_factor (through
        # on_decay(factor)) and training goes on; it stops at the plateau after the last decay.
        # A constant rate leaves the network jittering at its noise floor; annealing lowers it.
        self.decays, self.factor, self.on_decay = int(decays), float(decay_factor), on_decay
        self.decayed = 0
        self.curve: list[tuple[int, float]] = []
        self.best, self.bad, self.stopped_at = float("inf"), 0, None
        self.sync = False  # set by train_steps when it runs data parallel: take rank 0's value

    def after_step(self, step: int) -> bool:
        """Called with the number of steps done; True = stop now."""
        if step % self.every:
            return False
        # Data parallel (the teacher stage): every rank evaluates, and rank 0's value is taken by
        # all, so the counters, the decays and the stop are the same on every rank even if the
        # devices round differently (a rank stopping alone would leave the others hanging in DDP's
        # next all-reduce).
        value = float(self.evaluate())
        if self.sync:
            value = _rank0_value(value)
        self.curve.append((step, value))
        if value < self.best * (1 - self.tol):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        if self.bad >= self.patience and step >= self.min_steps:
            if self.decayed < self.decays:
                self.decayed += 1
                self.bad = 0
                if self.on_decay is not None:
                    self.on_decay(self.factor)
                return False
            self.stopped_at = step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"curve": [list(c) for c in self.curve], "best": self.best, "bad": self.bad, "decayed": self.decayed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curve = [(int(a), float(b)) for a, b in state["curve"]]
        self.best, self.bad = float(state["best"]), int(state["bad"])
        self.decayed = int(state.get("decayed", 0))


def _rank0_value(value: float) -> float:
    """``value`` of rank 0 on every rank; the value itself with one process."""
    if not torch.distributed.is_initialized():
        return value
    # float64 on the backend's device: gloo reduces CPU tensors, nccl only CUDA ones.
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def train_steps(stage: str, model: torch.nn.Module, opt, sched, data_rng: torch.Generator, ckpt: Checkpoint,
                steps: int, loss_at, window: int = 100, clip: float = 1.0,
                extra_state: dict[str, Any] | None = None,
                monitor: PlateauStop | None = None,
                info: DistInfo | None = None) -> tuple[int, list[float], float]:
    """The loop of the single-network stages (teacher, ssl_backbone, stage 1 of feature priors):
    resume from ``ckpt`` (model, optimiser, schedule when there is one, data generator, step),
    then per step ``loss_at(step)``, a finite check naming the stage, backward, clipping,
    optimiser and schedule steps, and a checkpoint when due. ``extra_state`` is saved with every
    checkpoint and must match on resume (a fingerprint of inputs the caller recomputes), else
    the checkpoint belongs to other inputs and training starts over. ``monitor`` (a PlateauStop)
    may end training before ``steps``; its state is checkpointed too.
    Data parallel (``info`` with world_size > 1; the teacher stage): ``loss_at(step)`` returns
    this rank's loss through a DistributedDataParallel wrapper of ``model`` (which averages the
    gradients in backward), every rank loads the checkpoint, rank 0 alone writes it and shows
    progress, and the finite check and the recorded losses use the mean over ranks, so every rank
    stops at the same step. ``model`` is the bare module (its state_dict has no ``module.`` prefix).
    Returns (first step run, the last ``window`` losses, seconds spent in the loop)."""
    import time
    info = info or DistInfo()
    start = 0
    if (state := ckpt.load(extra_state)) is not None:
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        data_rng.set_state(state["data_rng"]); start = state["step"]
        if monitor is not None:
            monitor.load_state_dict(state["monitor"])
    if info.distributed:
        distributed.barrier()  # all ranks have read ckpt.pt before rank 0 may replace it
        if monitor is not None:
            monitor.sync = True
    t0, recent = time.perf_counter(), []
    bar = progress(steps, stage, start) if info.is_main else tqdm(disable=True)
    # Log lines, progress.json and TensorBoard scalars in the stage's run directory (the
    # checkpoint's folder; none for a prior fitted outside a stage).
    from benchmark.monitor import TrainMonitor
    mon = TrainMonitor(stage.split("/")[0], ckpt.path.parent if ckpt.path is not None else None, steps, start,
                       unit="steps", is_main=info.is_main)
    for step in range(start, steps):
        loss = loss_at(step)
        # The mean over ranks; with one process the loss itself (no collective, the old path). Only
        # a data-parallel caller all-reduces: a stage run on rank 0 alone inside a process group
        # must not wait for ranks that never call.
        mean_loss = distributed.all_reduce_mean(loss.detach()) if info.distributed else loss.detach()
        check_finite(mean_loss, stage, step)
        opt.zero_grad(set_to_none=True); loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        recent = (recent + [float(mean_loss)])[-window:]
        bar.update(1)
        mon.step(step + 1, recent[-1], lr=opt.param_groups[0]["lr"], grad_norm=float(grad), items=1)
        if monitor is not None and monitor.after_step(step + 1):
            log.info("%s: held-out loss plateaued at step %d (curve %s)", stage, step + 1, monitor.curve[-4:])
            break
        if info.is_main and ckpt.due(step + 1) and step + 1 < steps:
            ckpt.save(step + 1, model=model.state_dict(), opt=opt.state_dict(),
                      sched=None if sched is None else sched.state_dict(), data_rng=data_rng.get_state(),
                      extra=extra_state or {},
                      **({} if monitor is None else {"monitor": monitor.state_dict()}))
    bar.close()
    mon.close()
    return start, recent, time.perf_counter() - t0

