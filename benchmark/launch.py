"""Launchers. ``local`` runs the stage DAG on this machine in dependency order: in this process
(``workers: 1``), or in a pool of worker processes that run independent stages side by side.

A finished stage (its record.json exists) is skipped; a failed stage is recorded in
failed.json with its reason and log, its dependents are marked blocked, and the rest of the
grid goes on. Ctrl-C stops at once: finished stages and the last checkpoint of the running one
stay, so the next run continues where this one stopped.
"""
from __future__ import annotations

import logging
import platform
import socket
import time
import traceback
from datetime import datetime, timezone

import torch
import yaml

from benchmark import accel, distributed
from benchmark.dag import Node, longest_chains
from benchmark.host_cpu import cpu_facts
from benchmark.monitor import Ledger
from benchmark.registry import import_plugins
from benchmark.stages import runner
from benchmark.store import write_json, write_text

log = logging.getLogger(__name__)


def _stage_log(node: Node) -> logging.Handler:
    h = logging.FileHandler(node.dir / "stage.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)
    return h


def run_node(node: Node) -> dict:
    """Run one stage to completion and write its record (the last file it writes)."""
    node.dir.mkdir(parents=True, exist_ok=True)
    write_text(node.dir / "config.yaml", yaml.safe_dump(node.cfg, sort_keys=False))
    write_json(node.dir / "slice.json", {"stage": node.stage, "key": node.key, "slice": node.slice,
                                         "deps": {r: d.key for r, d in node.deps.items()}})
    (node.dir / "failed.json").unlink(missing_ok=True)
    # A stage may run in a fresh process (a spawned worker, a SLURM job, a requeue) that never
    # loaded the config: modules named in `plugins=[...]` must register there too.
    import_plugins(node.cfg.get("plugins") or [])
    handler = _stage_log(node)
    # Every attempt (first run, requeue, rerun after a kill) is kept with its devices, so the
    # record's device-hours are what the stage cost in all, not what its last attempt took.
    info = distributed.current(node.cfg.get("device", "auto"))
    ledger = Ledger(node.dir)
    ledger.begin(info.world_size, info.device.type)
    accel.configure(info.device)  # TF32 and cuDNN autotuning on CUDA; nothing on the CPU
    t0 = time.perf_counter()
    try:
        facts = runner(node.stage)(node)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    wall = time.perf_counter() - t0
    ledger.beat()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"stage": node.stage, "key": node.key, "deps": {r: d.key for r, d in node.deps.items()},
              "facts": facts, "wall_time_s": wall,
              # device-hours: wall time x processes (one per GPU) summed over every attempt
              # (attempts.json; an attempt killed between two progress lines loses at most that
              # interval). On the CPU: process-hours.
              "device_hours": ledger.device_hours(), "attempts": ledger.attempts(),
              "world_size": info.world_size, "device": device, "host": socket.gethostname(),
              "cpu": cpu_facts(),  # hosts differ in bf16 kernels, so in rounding and speed
              "torch": torch.__version__, "python": platform.python_version(),
              "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(node.record_path, record)
    return record


def write_failure(node: Node, exc: BaseException, **extra: str) -> None:
    """Record why a stage failed (call inside the ``except`` block: it saves the traceback)."""
    write_json(node.dir / "failed.json", {
        "stage": node.stage, "key": node.key, "reason": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(), "log": str(node.dir / "stage.log"), **extra,
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the grid process dies (kill -9 included), so no orphan
    keeps writing checkpoints that the next run resumes from."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux/glibc: workers end when their task does


def _worker_init(threads: int) -> None:
    import os
    _die_with_parent()
    torch.set_num_threads(threads)
    # numpy's BLAS (OpenBLAS) sizes its pool to every core whatever torch was told, so two workers
    # on two cores ran four BLAS threads in the metrics' numpy work (KID's kernel matrices, np.cov).
    # KID, 500 x 2048 features, 20 subsets, in a 1-thread worker with the sweep running: 1.78 s
    # with the default pool, 0.95 s with one thread. Not a context manager: the limit stays.
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=threads, user_api="blas")
    os.environ["DMVAE_NO_BARS"] = "1"  # several workers' bars would overwrite each other
    from benchmark.logs import setup_logging
    setup_logging()


def _run_in_worker(node: Node) -> tuple[str, dict | None, str | None]:
    """Worker side: run one stage; failures are recorded here, where the traceback is."""
    try:
        return "done", run_node(node), None
    except Exception as exc:  # one failing stage must not stop the grid
        write_failure(node, exc)
        return "failed", None, f"{type(exc).__name__}: {exc}"


def resolve_workers(cfg: dict | None) -> tuple[int, int]:
    """(worker processes, torch threads per worker) from the local launcher's config."""
    import os
    cfg = cfg or {}
    workers = max(1, int(cfg.get("workers", 1) or 1))
    threads = cfg.get("threads_per_worker", "auto")
    if threads in (None, "auto"):
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else torch.get_num_threads()
    return workers, int(threads)


def run_local(order: list[Node], workers: int = 1, threads_per_worker: int | None = None) -> dict[str, str]:
    """Run every unfinished node; returns key -> done | failed | blocked.

    With ``workers > 1`` ready stages (all inputs done) run concurrently in that many spawned
    processes with ``threads_per_worker`` torch threads each. On the 2-core reference machine
    two 1-thread workers get 8-19% more work done per second than one 2-thread process (small
    kernels do not scale to a second thread), so the embedded default uses two.
    """
    if workers > 1:
        return _run_pool(order, workers, threads_per_worker or 1)
    status: dict[str, str] = {}
    todo = [n for n in order if not n.done()]
    log.info("%d stages in the grid: %d done, %d to run", len(order), len(order) - len(todo), len(todo))
    i = 0
    for node in order:
        if node.done():
            status[node.key] = "done"
            continue
        i += 1
        bad = [d.key for d in node.deps.values() if status.get(d.key) != "done"]
        who = ", ".join(node.cells[:3]) + (" ..." if len(node.cells) > 3 else "")
        if bad:
            status[node.key] = "blocked"
            log.warning("[%d/%d] %-10s %s blocked by failed %s", i, len(todo), node.stage, who, bad)
            continue
        log.info("[%d/%d] %-10s %s -> %s", i, len(todo), node.stage, who, node.dir)
        try:
            rec = run_node(node)
        except Exception as exc:  # one failing stage must not stop the grid
            status[node.key] = "failed"
            write_failure(node, exc)
            log.error("[%d/%d] %-10s FAILED: %s (log: %s)", i, len(todo), node.stage, exc, node.dir / "stage.log")
            continue
        status[node.key] = "done"
        log.info("[%d/%d] %-10s done in %.1fs %s", i, len(todo), node.stage, rec["wall_time_s"],
                 _headline(rec["facts"]))
    return status


# Rough relative cost of each stage kind at the CPU presets, in minutes of one thread: the stage
# times of the default sweep with compiled DiTs (README, "Two commands"); only their order matters
# for scheduling. latent_cache: 20,000 images and their flips through the cpu-tiny encoder.
STAGE_COST = {"domain_detector": 4.0, "fid_ref": 1.1, "ssl_backbone": 0.9, "reference": 0.4, "teacher": 5.0,
              "tokenizer": 3.5, "recon_eval": 1.3, "latent_cache": 0.8, "generator": 1.0, "gen_eval": 2.1}


def critical_path(nodes: list[Node]) -> dict[str, float]:
    """For each node, the estimated cost of the longest chain from it to the end of the grid."""
    return longest_chains({n.key: [d.key for d in n.deps.values()] for n in nodes},
                          {n.key: STAGE_COST.get(n.stage, 1.0) for n in nodes})


def _run_pool(order: list[Node], workers: int, threads: int) -> dict[str, str]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    status = {n.key: "done" for n in order if n.done()}
    todo = [n for n in order if n.key not in status]
    log.info("%d stages in the grid: %d done, %d to run on %d workers x %d threads",
             len(order), len(status), len(todo), workers, threads)
    # Longest-path-first list scheduling: among ready stages start the one with the most work
    # still behind it, so a long chain (e.g. the kl cell's tokenizer -> generator -> gen_eval)
    # does not end up running alone after everything else.
    prio = critical_path(todo)
    pending = sorted(todo, key=lambda n: -prio[n.key])  # stable: ties keep topological order
    running: dict = {}
    n_started = 0
    # spawn, not fork: torch's thread pools and OpenMP state do not survive a fork safely.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))
    try:
        while pending or running:
            for node in list(pending):
                if len(running) >= workers:
                    break
                deps = [status.get(d.key) for d in node.deps.values()]
                if any(s in ("failed", "blocked") for s in deps):
                    pending.remove(node)
                    status[node.key] = "blocked"
                    log.warning("%-10s %s blocked by failed %s", node.stage, node.cells[0],
                                [d.key for d in node.deps.values() if status.get(d.key) != "done"])
                    continue
                if all(s == "done" for s in deps):
                    pending.remove(node)
                    n_started += 1
                    who = ", ".join(node.cells[:3]) + (" ..." if len(node.cells) > 3 else "")
                    log.info("[%d/%d] %-10s %s -> %s", n_started, len(todo), node.stage, who, node.dir)
                    running[pool.submit(_run_in_worker, node)] = node
            if not running:
                if pending and not any(all(status.get(d.key) == "done" for d in n.deps.values())
                                       or any(status.get(d.key) in ("failed", "blocked") for d in n.deps.values())
                                       for n in pending):
                    for node in pending:  # inputs outside this run that are not finished
                        status[node.key] = "blocked"
                        log.warning("%-10s blocked: unfinished inputs outside this run", node.stage)
                    pending.clear()
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                node = running.pop(fut)
                state, rec, err = fut.result()
                status[node.key] = state
                if state == "done":
                    log.info("%-10s done in %.1fs %s (%s)", node.stage, rec["wall_time_s"],
                             _headline(rec["facts"]), node.cells[0])
                else:
                    log.error("%-10s FAILED: %s (log: %s)", node.stage, err, node.dir / "stage.log")
    except BaseException:
        # Ctrl-C reaches the workers too (same process group); their checkpoints stay on disk.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return status


def _headline(facts: dict) -> str:
    keys = ("psnr", "ssim", "rfid", "gfid", "latent_swd_to_prior", "n_ref")
    return " ".join(f"{k}={facts[k]:.4g}" for k in keys if isinstance(facts.get(k), (int, float)))

