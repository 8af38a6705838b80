"""Multi-process data parallelism from the launcher's environment (torchrun or SLURM tasks).

Training code asks this module who it is (rank, world size, device) and never imports a
launcher: ``torchrun --nproc_per_node=2 -m benchmark.run_stage ...`` and ``srun --ntasks=2
python -m benchmark.run_stage ...`` both end up here. One process (no launcher variables, or a
world of 1) creates no process group at all, so the default path costs nothing.

``sharded_batches`` is the one scheduler of batch-parallel passes over a set (fixed batches dealt
round-robin over the ranks): the evaluation stages gather the results to rank 0, the feature
prior's stage 1 to every rank.

Environment variables, and why each is read:

torchrun (torch.distributed.run, "elastic launch"):
  RANK         global index of this process: decides who writes files (rank 0) and which
               slice of the global batch this process computes.
  WORLD_SIZE   number of processes: the batch is split into this many slices; 1 = no group.
  LOCAL_RANK   index on this node: picks the GPU (cuda:LOCAL_RANK).
  MASTER_ADDR, MASTER_PORT
               where rank 0's rendezvous store listens; torchrun always sets them.
SLURM (srun / sbatch with --ntasks > 1; submitit launches the same way), used when torchrun's
variables are absent:
  SLURM_PROCID        global task index -> rank.
  SLURM_STEP_NUM_TASKS, else SLURM_NTASKS
                      number of tasks of the job step -> world size (srun sets the first; an
                      sbatch script sees only the job's SLURM_NTASKS).
  SLURM_LOCALID       task index on its node -> local rank (GPU).
  SLURM_STEP_ID       set only inside an srun step: without it a batch script with
                      --ntasks > 1 ran python directly, and waiting for the other tasks would
                      hang, so that is an error.
  SLURM_JOB_NODELIST  the first host of the allocation runs rank 0 -> MASTER_ADDR
                      (localhost when unset), unless MASTER_ADDR is already set.
  SLURM_JOB_ID        MASTER_PORT = 15000 + job id mod 20000 (unless MASTER_PORT is set), so
                      two jobs sharing a node do not race for one port.
"""
from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process (pure data, parsed without side effects)."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "none"


_INFO: DistInfo | None = None


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003' (zero padding kept)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", first)
    if m is None:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "localhost"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    if world > 1:
        if "SLURM_STEP_ID" not in env:
            raise RuntimeError(f"SLURM_NTASKS={world} but this process was not started by srun, so the "
                               f"other {world - 1} tasks will never join; launch it as `srun python -m "
                               f"benchmark.run_stage ...` or request --ntasks=1")
        port = int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        rank, local_rank = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
        return LaunchEnv(rank, world, local_rank, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "localhost", 0, "none")


def _device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        # With --gpus-per-task=1 every task sees one GPU as cuda:0, hence the modulo.
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def init_from_env(device: str = "auto", env: Mapping[str, str] | None = None) -> DistInfo:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); world 1 joins nothing."""
    global _INFO
    if _INFO is not None:
        return _INFO
    le = launch_env(env)
    dev = _device(device, le.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if le.world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU up front (barriers then need no device hint).
        # Rank 0 alone scores a 50K-sample evaluation (FD, precision/recall) while the other ranks
        # wait at the final barrier: NCCL's default 10-minute timeout would abort them.
        dist.init_process_group(backend, init_method=f"tcp://{le.master_addr}:{le.master_port}",
                                rank=le.rank, world_size=le.world_size, timeout=timedelta(hours=2),
                                device_id=dev if dev.type == "cuda" else None)
        log.info("rank %d/%d (local %d) joined a %s group at %s:%d from %s variables on %s", le.rank,
                 le.world_size, le.local_rank, backend, le.master_addr, le.master_port, le.source, dev)
    _INFO = DistInfo(le.rank, le.world_size, le.local_rank, dev)
    return _INFO


def current(device: str = "auto") -> DistInfo:
    """This process's DistInfo; a single process on `device` when init_from_env was not called."""
    return _INFO if _INFO is not None else DistInfo(device=_device(device, 0))


def is_main() -> bool:
    return _INFO is None or _INFO.is_main


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (for logging and checks); the value itself when there is one process."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def sharded_batches(n: int, batch_size: int, work: Callable[[torch.Tensor], Any], info: DistInfo,
                    what: str = "batches", to_all: tuple[int, ...] | None = None) -> Iterator[Any]:
    """``work(idx)`` for every batch of ``index_batches(n, batch_size)``, data-parallel: batch i
    runs on rank i mod W, and rank 0 yields every batch's result in the original order (the
    other ranks yield nothing, but must iterate too: every round is a collective).

    The batches are those of one process whatever W is, so every image is scored in the same
    batch (a bf16 network's rounding can depend on its batch) and W ranks give one process's
    numbers. Results are gathered round by round, one batch per rank, so the ranks move in step
    and rank 0 holds at most W batches' results beyond what its caller keeps. One process runs
    ``work`` in place and gathers nothing.

    ``to_all`` None (the evaluation stages): results go to rank 0 only (gather_object: gloo on
    CPU, NCCL on GPUs), the others keep nothing. ``work`` must return CPU tensors in dicts, lists
    or tuples (or None, ints, floats, strings), and no views of large tensors (a serialised view
    carries its whole storage).

    ``to_all`` a shape (stage 1 of the feature prior, which trains on the features on every
    rank): ``work`` returns a float32 tensor [len(idx), *to_all] on ``info.device``, and every
    rank yields every batch's rows, all-gathered as tensors (no serialisation, and device to
    device under NCCL)."""
    from benchmark.metrics.streaming import index_batches
    batches = list(index_batches(n, batch_size))
    world, count = info.world_size, len(batches)
    every = max(1, -(-count // world) // 10)  # about ten progress lines per pass
    for r, first in enumerate(range(0, count, world)):
        i = first + info.rank
        out = work(batches[i]) if i < count else None
        if world == 1:
            yield out
        elif to_all is None:
            yield from _gather_to_main(out, batches[first:first + world], info)
        else:
            yield from _all_gather_rows(out, batches[first:first + world], info, to_all, what)
        if (r + 1) % every == 0 or first + world >= count:
            log.info("%s: %d/%d batches of %d on %d rank(s)", what, min(count, first + world), count, batch_size,
                     world)


def _gather_to_main(out: Any, round_batches: Sequence[torch.Tensor], info: DistInfo) -> list[Any]:
    """One round's results (one per batch of ``round_batches``) on rank 0; nothing elsewhere."""
    got: list[Any] | None = [None] * info.world_size if info.is_main else None
    # weights_only: results are tensors in plain containers, so they go through torch.save
    # and torch.load(weights_only=True) like every file here (benchmark/store.py), not pickle.
    dist.gather_object(out, got, dst=0, weights_only=True)
    return [] if got is None else got[:len(round_batches)]


def _all_gather_rows(out: torch.Tensor | None, round_batches: Sequence[torch.Tensor], info: DistInfo,
                     shape: tuple[int, ...], what: str) -> list[torch.Tensor]:
    """One round's row tensors (one per batch of ``round_batches``) on every rank. A rank with no
    batch this round (``out`` None) sends no rows."""
    rows = torch.zeros(0, *shape, device=info.device) if out is None else out
    if tuple(rows.shape[1:]) != tuple(shape):
        raise ValueError(f"{what}: rank {info.rank} computed rows of shape {tuple(rows.shape[1:])}, "
                         f"expected {tuple(shape)}")
    # all_gather needs one shape on every rank: the short last batch and the idle ranks pad to
    # the round's first (longest) batch, and the padding is dropped again.
    padded = torch.zeros(len(round_batches[0]), *shape, device=info.device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return [part[:len(idx)] for part, idx in zip(parts, round_batches)]


def finish() -> None:
    """The end of a run that succeeded on this rank: wait for every rank, then tear the group down.

    Without the barrier a rank that finishes first destroys its end of the group while another
    still writes its record or sends its last collective; gloo then aborts that rank ("terminate
    called without an active exception", seen once in CI). Only for the success path: after a
    failure the other ranks may never reach the barrier, so ``finally`` blocks call ``cleanup``."""
    barrier()
    cleanup()


def cleanup() -> None:
    """Tear the process group down at once (no barrier, so it is safe after a rank has failed)."""
    global _INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None
