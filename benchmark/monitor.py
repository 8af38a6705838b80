"""What a training stage tells the outside world while it runs, with or without a terminal.

``TrainMonitor`` is called once per optimiser step by every training loop. Every ``every`` steps
(``DMVAE_LOG_EVERY``, default 50) it:
- logs one line (step/total, loss, learning rate, grad norm, throughput, ETA) through ``logging``,
  so it lands in the stage's ``stage.log`` and in the SLURM job's log: progress bars are off
  without a terminal, and a cluster job used to print nothing until it ended;
- writes ``progress.json`` in the run directory (atomically), which ``python -m benchmark.status``
  reads to show step, total and ETA of running stages;
- adds the same scalars to TensorBoard event files in ``<run dir>/tb/`` (``tensorboard --logdir
  runs/stages``), and to Weights & Biases when ``wandb`` is installed and ``WANDB_PROJECT`` is set.

``Ledger`` keeps the time a stage has spent over all its attempts (a requeue or a kill -9 starts a
new one): device-hours = wall time x devices (GPUs, else processes), summed over attempts, so a
stage that was requeued five times reports what it cost, not what its last attempt took.
"""
from __future__ import annotations

import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmark.store import read_json, write_json

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
LEDGER_FILE = "attempts.json"
DEFAULT_EVERY = 50


def log_every() -> int:
    value = os.environ.get("DMVAE_LOG_EVERY", str(DEFAULT_EVERY))
    try:
        every = int(value)
    except ValueError:
        raise ValueError(f"DMVAE_LOG_EVERY must be a whole number of steps, got {value!r}") from None
    if every < 1:
        raise ValueError(f"DMVAE_LOG_EVERY must be >= 1, got {every}")
    return every


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Ledger:
    """Attempts of one stage: when each started, when it was last seen alive, on how many
    devices. Written by rank 0 only (the caller checks)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LEDGER_FILE

    def _load(self) -> list[dict[str, Any]]:
        return list(read_json(self.path)) if self.path.exists() else []

    def begin(self, devices: int, device: str) -> None:
        attempts = self._load()
        t = time.time()
        attempts.append({"started": t, "last_seen": t, "devices": int(max(devices, 1)), "device": device,
                         "started_at": _now()})
        write_json(self.path, attempts)

    def beat(self) -> None:
        attempts = self._load()
        if attempts:
            attempts[-1]["last_seen"] = time.time()
            write_json(self.path, attempts)

    def device_hours(self) -> float:
        return sum((a["last_seen"] - a["started"]) * a["devices"] for a in self._load()) / 3600.0

    def attempts(self) -> int:
        return len(self._load())


class TrainMonitor:
    """Log lines, progress.json and TensorBoard scalars of one training loop (rank 0 writes)."""

    def __init__(self, stage: str, run_dir: Path | None, total: int, start: int = 0, unit: str = "samples",
                 is_main: bool = True, every: int | None = None) -> None:
        self.stage, self.total, self.unit = stage, int(total), unit
        self.dir = Path(run_dir) if run_dir is not None else None
        self.active = is_main
        self.every = every or log_every()
        self.start = self.last_step = int(start)
        self.t0 = self.t_last = time.perf_counter()
        self.items = 0
        self._tb = self._wandb = None
        if self.active and self.dir is not None:
            self._open_writers()

    def _open_writers(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a resumed run overwrites the events past its checkpoint, so the curve
            # has one value per step after a requeue.
            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=self.start or None)
        except ImportError:  # tensorboard is a dependency; a stripped install still trains
            log.warning("%s: tensorboard is not installed; no event files", self.stage)
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb
                self._wandb = wandb.init(project=os.environ["WANDB_PROJECT"], name=f"{self.stage}-{self.dir.name}",
                                         id=self.dir.name, resume="allow", dir=str(self.dir))
            except ImportError:
                log.warning("WANDB_PROJECT is set but wandb is not installed; logging to TensorBoard only")

    def step(self, step: int, loss: float, lr: float | None = None, grad_norm: float | None = None,
             items: int = 0, **scalars: float) -> None:
        """After optimiser step ``step`` (1-based count of steps done) of ``items`` samples."""
        self.items += items
        if not self.active or (step % self.every and step != self.total):
            return
        now = time.perf_counter()
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)  # steps/s of this attempt
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        per_s = self.items / max(now - self.t0, 1e-9)
        parts = [f"{self.stage} step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%)",
                 f"loss {loss:.4g}"]
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        if grad_norm is not None:
            parts.append(f"grad {grad_norm:.3g}")
        parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
        parts.append(f"{per_s:.1f} {self.unit}/s, ETA {fmt_duration(eta)}")
        log.info(" | ".join(parts))
        values = {"loss": loss, **({"lr": lr} if lr is not None else {}),
                  **({"grad_norm": grad_norm} if grad_norm is not None else {}), **scalars,
                  f"{self.unit}_per_s": per_s}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{self.stage}/{k}", float(v), step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{self.stage}/{k}": v for k, v in values.items()}, step=step)
        if self.dir is not None:
            write_json(self.dir / PROGRESS_FILE, {"stage": self.stage, "step": step, "total": self.total,
                                                  "eta_s": eta if math.isfinite(eta) else None,
                                                  "steps_per_s": rate, "loss": loss, "updated_at": _now()})
            Ledger(self.dir).beat()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress_of(run_dir: Path) -> dict[str, Any] | None:
    """The last progress.json of a stage, or None."""
    p = Path(run_dir) / PROGRESS_FILE
    return read_json(p) if p.exists() else None
