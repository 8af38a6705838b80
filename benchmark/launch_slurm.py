"""``launcher=slurm``: submit every unfinished stage of a sweep as one SLURM job and return.

One submitit job per stage node that has no record.json yet; shared nodes (fid_ref, reference,
teacher) are nodes like any other, so they are submitted once. A job depends ``afterok`` on the
jobs of its unfinished inputs, with ``--kill-on-invalid-dep=yes`` so that the dependents of a
failed stage are cancelled instead of pending forever. A last job (``aggregate``, ``afterany``)
writes the sweep's tables. Job ids are stored in ``<sweep_dir>/slurm_jobs.json``, which
``python -m benchmark.status`` reads; a rerun reuses the jobs that are still queued or running
and submits only what is missing or failed. Logs: ``<run_root>/slurm/<job id>/``.

Requeue (timeout, preemption, ``scontrol requeue``): the job runs ``run_node`` again and the
stage resumes from its last checkpoint; submitit's checkpoint/requeue protocol lives here, in
:class:`StageJob`, so that training code never imports submitit (STYLE.md rule 7).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit
import yaml

from benchmark.dag import Node
from benchmark.job_resources import RESOURCES, stage_resources
from benchmark.stages import stage_names
from benchmark.upstream import STAGES
from benchmark.store import read_json, write_json

log = logging.getLogger(__name__)

OTHER_KEYS = ("name", "profile", "signal_delay_s", "max_requeues", "stages")


def job_stages() -> tuple[str, ...]:
    """Every stage kind (plug-ins' included) plus the final tables job."""
    return stage_names() + ("aggregate",)


PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
JOBS_FILE = "slurm_jobs.json"
# States in which a job will still run (or is running): a rerun reuses such a job.
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"})


# ------------------------------------------------------------------------------ configuration
def _known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _load_profile(name: str) -> dict:
    path = Path(name).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown SLURM profile {name!r}. Known profiles: {', '.join(_known_profiles())} "
                         f"(in {PROFILE_DIR}), or give the path of a .yaml file")
    return yaml.safe_load(path.read_text()) or {}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _user_paths(overrides: list[str]) -> list[list[str]]:
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [k.split(".")[1:] for k in keys if k.startswith("launcher.")]


def resolve(launcher: dict, overrides: list[str] = ()) -> dict:
    """Launcher config = slurm.yaml defaults < profile < command-line overrides."""
    cfg = dict(launcher)
    if cfg.get("profile"):
        profile = _load_profile(str(cfg["profile"]))
        cfg = _merge(cfg, profile)
        for path in _user_paths(list(overrides)):  # the user's own values win over the profile
            src, dst = launcher, cfg
            for k in path[:-1]:
                src, dst = src.get(k, {}), dst.setdefault(k, {})
            if path and path[-1] in src:
                dst[path[-1]] = src[path[-1]]
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Reject a launcher config that cannot work, before anything is submitted."""
    unknown = set(cfg) - set(RESOURCES) - set(OTHER_KEYS)
    if unknown:
        raise ValueError(f"unknown launcher key(s) {sorted(unknown)}; known: {', '.join(RESOURCES + OTHER_KEYS)}")
    for stage, res in (cfg.get("stages") or {}).items():
        if stage not in job_stages():
            raise ValueError(f"launcher.stages.{stage}: unknown stage; stages: {', '.join(job_stages())}")
        bad = set(res or {}) - set(RESOURCES)
        if bad:
            raise ValueError(f"launcher.stages.{stage}: unknown key(s) {sorted(bad)}; known: {', '.join(RESOURCES)}")
    for stage in job_stages():
        r = stage_resources(cfg, stage)
        for k in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "nodes", "tasks_per_node"):
            v = r[k]
            if k == "timeout_min" and v == "auto":
                if not r["gpus_per_node"] and stage != "aggregate":
                    raise ValueError(f"launcher timeout_min=auto for stage {stage} needs GPUs: the limit comes "
                                     f"from the GPU cost model (benchmark/plan.py); give minutes for CPU stages")
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < (0 if k == "gpus_per_node" else 1):
                raise ValueError(f"launcher {k} for stage {stage} must be a number >= "
                                 f"{0 if k == 'gpus_per_node' else 1}; got {v!r}")
        if r["gpus_per_node"] and r["tasks_per_node"] > r["gpus_per_node"]:
            # One task per GPU (distributed.py picks cuda:LOCAL_RANK): more tasks than GPUs on a
            # node would put two ranks on one device or index a GPU that does not exist.
            raise ValueError(f"stage {stage!r} asks for tasks_per_node={r['tasks_per_node']} on nodes with "
                             f"gpus_per_node={r['gpus_per_node']}: at most one task per GPU")
        if r["nodes"] * r["tasks_per_node"] > 1:
            distributed = stage != "aggregate" and STAGES.get(stage).distributed
            if not distributed:
                multi = [s for s in stage_names() if STAGES.get(s).distributed]
                raise ValueError(f"stage {stage!r} runs in one process only, but its launcher config asks for "
                                 f"nodes={r['nodes']} x tasks_per_node={r['tasks_per_node']}; the stages that "
                                 f"run data-parallel are {', '.join(multi)} "
                                 f"(launcher.stages.<stage>.tasks_per_node)")


def executor_parameters(cfg: dict, stage: str, name: str, limit_min: int | None = None) -> dict:
    """submitit's parameters of a stage's job; ``timeout_min: auto`` takes ``limit_min``, the
    cost model's estimate plus its margin (benchmark/plan.py)."""
    r = dict(stage_resources(cfg, stage))
    if r["timeout_min"] == "auto":
        r["timeout_min"] = limit_min if limit_min else 60  # the tables job: no model, an hour is ample
    p: dict[str, Any] = {"job_name": name, "nodes": int(r["nodes"]), "ntasks_per_node": int(r["tasks_per_node"]),
                         "cpus_per_task": int(r["cpus_per_task"]), "mem": f"{int(r['mem_gb'] * 1024)}MB",
                         "time": int(r["timeout_min"]), "signal_delay_s": int(cfg.get("signal_delay_s", 120)),
                         # one intra-op thread per allocated CPU, unless the caller pinned it
                         "setup": ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]}
    for k in ("partition", "account", "qos", "constraint"):
        if r[k]:
            p[k] = str(r[k])
    if r["gpus_per_node"]:  # --gpus-per-node=0 is an error on clusters without GRES
        p["gpus_per_node"] = int(r["gpus_per_node"])
    return p


# ------------------------------------------------------------------------------ the jobs
def _setup_job_logging() -> None:
    from benchmark.logs import setup_logging
    setup_logging()


class StageJob(submitit.helpers.Checkpointable):
    """Runs one stage node in a SLURM job; every task of a multi-task job runs it, rank 0 writes.

    On timeout or preemption submitit calls :meth:`checkpoint`, which resubmits this same
    callable: the stage then resumes from its own last checkpoint (ckpt.pt).
    """

    def __call__(self, node: Node) -> dict | None:
        _setup_job_logging()
        env = submitit.JobEnvironment()
        log.info("%s: slurm job %s, task %d/%d on %s", node.key, env.job_id, env.global_rank,
                 env.num_tasks, env.hostname)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts:  # SLURM sets it on every requeue: signal path, scontrol requeue, node failure alike
            log.warning("%s: slurm job %s was requeued (restart %d); the stage resumes from its last "
                        "checkpoint", node.key, env.job_id, restarts)
        if node.done():  # requeued after the record was written (the kill came late): keep it
            log.info("%s is already done: %s", node.key, node.record_path)
            return read_json(node.record_path)
        if env.num_tasks == 1:
            from benchmark.launch import run_node
            try:
                return run_node(node)
            except Exception as exc:
                _write_failure(node, exc, env.paths.stderr)
                raise  # the job ends FAILED, so afterok dependents are cancelled
        from benchmark import distributed
        from benchmark.run_stage import run_one
        info = distributed.init_from_env(node.cfg.get("device", "auto"))
        if not info.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one copy of the log, from rank 0
        try:
            rec = run_one(node, info)
            distributed.finish()  # nobody exits before rank 0 has written the record
            return rec
        except Exception as exc:
            if info.is_main:
                _write_failure(node, exc, env.paths.stderr)
            raise
        finally:
            distributed.cleanup()

    def checkpoint(self, node: Node) -> submitit.helpers.DelayedSubmission:
        # submitit calls this from its SIGUSR2 handler (SLURM's --signal before the time limit, or
        # a preemption) in task 0; returning the same call makes submitit `scontrol requeue` the job.
        # Nothing is saved here: the stage resumes from its own periodic ckpt.pt.
        log.warning("%s: caught the timeout/preemption signal in slurm job %s; requeueing it, the "
                    "stage resumes from its last checkpoint", node.key, os.environ.get("SLURM_JOB_ID", "?"))
        return submitit.helpers.DelayedSubmission(self, node)


def _write_failure(node: Node, exc: Exception, slurm_log: Path) -> None:
    from benchmark.launch import write_failure
    write_failure(node, exc, slurm_log=str(slurm_log).replace("%t", "0"))


class AggregateJob(submitit.helpers.Checkpointable):
    """Writes the sweep's tables and plot once every stage job has ended (afterany)."""

    def __call__(self, sweep_dir: Path, run_root: Path) -> str:
        _setup_job_logging()
        from benchmark import aggregate
        wide = aggregate.write_tables(sweep_dir, run_root)
        aggregate.tradeoff_plot(wide, sweep_dir / "tradeoff.png")
        return str(sweep_dir / "results.md")


# ------------------------------------------------------------------------------ SLURM queries
def controller_reachable() -> str | None:
    """None when sbatch and a controller answer, else why not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch/sinfo not found (no SLURM client installed)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if r.returncode != 0:
        return f"sinfo cannot reach a controller: {r.stderr.strip() or r.stdout.strip()}"
    return None


def job_states(ids: list[str]) -> dict[str, str]:
    """Job id -> SLURM state (squeue for live jobs, sacct for ended ones); unknown ids are left out."""
    ids = [str(i) for i in ids if i]
    out: dict[str, str] = {}
    if not ids:
        return out
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30)
        for line in r.stdout.splitlines():
            jid, state, reason = (line.split("|") + ["", ""])[:3]
            if jid in ids:
                out[jid] = state if state != "PENDING" else f"PENDING ({reason})"
        rest = [i for i in ids if i not in out]
        if rest and shutil.which("sacct"):
            r = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(rest)],
                               capture_output=True, text=True, timeout=30)
            for line in r.stdout.splitlines():
                jid, state = (line.split("|") + [""])[:2]
                if jid in rest and state:
                    out[jid] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot query SLURM job states: %s", exc)
    return out


def is_active(state: str | None) -> bool:
    return bool(state) and state.split()[0] in ACTIVE


def load_jobs(sweep_dir: Path) -> dict:
    p = Path(sweep_dir) / JOBS_FILE
    return read_json(p) if p.exists() else {}


# ------------------------------------------------------------------------------ claims
# A stage's run directory is shared by every sweep that needs it (content-addressed). The job
# that will produce it is recorded there, so that a second sweep depends on that job instead of
# submitting the same stage again. The check and the claim happen under an exclusive lock on the
# run directory (flock; on NFS it needs v4 or lockd), so two sweeps submitted at once cannot both
# miss each other's claim.
CLAIM_FILE = "claim.json"


@contextlib.contextmanager
def _claim_lock(node: Node):
    node.dir.mkdir(parents=True, exist_ok=True)
    with open(node.dir / ".claim.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def claimed_job(node: Node) -> dict | None:
    """The claim of a job (any sweep's) that is still queued or running for ``node``, else None."""
    path = node.dir / CLAIM_FILE
    if not path.exists():
        return None
    claim = read_json(path)
    return claim if is_active(job_states([claim["job_id"]]).get(claim["job_id"])) else None


# ------------------------------------------------------------------------------ submission
def submit(order: list[Node], sweep_dir: Path, run_root: Path, cfg: dict,
           limits: dict[str, int] | None = None) -> dict[str, int]:
    """Submit the unfinished nodes of `order` (topological); returns counts. ``limits``: node key
    -> time limit in minutes from the cost model, for stages whose timeout_min is auto."""
    limits = limits or {}
    jobs = load_jobs(sweep_dir)
    states = job_states([j["job_id"] for j in jobs.values()])
    folder = run_root / "slurm" / "%j"
    job_of: dict[str, str] = {}  # node key -> job id that will produce it
    counts = {"done": 0, "reused": 0, "shared": 0, "submitted": 0}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def submit_one(fn, args: tuple, stage: str, name: str, dependency: str | None) -> submitit.Job:
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=int(cfg.get("max_requeues", 30)))
        extra = {"kill-on-invalid-dep": "yes"}
        if dependency:
            extra["dependency"] = dependency
        ex.update_parameters(**executor_parameters(cfg, stage, name, limits.get(name)), additional_parameters=extra)
        return ex.submit(fn, *args)

    try:
        for node in order:
            if node.done():
                counts["done"] += 1
                continue
            old = jobs.get(node.key)
            if old and is_active(states.get(old["job_id"])):
                job_of[node.key] = old["job_id"]
                counts["reused"] += 1
                continue
            after = sorted({job_of[d.key] for d in node.deps.values() if d.key in job_of}, key=int)
            deps = [d.key for d in node.deps.values()]
            with _claim_lock(node):
                other = claimed_job(node)
                if other is not None:  # another sweep's job will produce it: depend on that one
                    job_of[node.key] = other["job_id"]
                    counts["shared"] += 1
                    jobs[node.key] = {"job_id": other["job_id"], "stage": node.stage, "cells": node.cells,
                                      "deps": deps, "dir": str(node.dir), "log": other["log"],
                                      "submitted_at": other["submitted_at"], "claimed_by": other["sweep"]}
                    log.info("shared     %-10s job %s of sweep %s -> %s", node.stage, other["job_id"],
                             Path(other["sweep"]).name, node.dir)
                    continue
                job = submit_one(StageJob(), (node,), node.stage, node.key,
                                 "afterok:" + ":".join(after) if after else None)
                write_json(node.dir / CLAIM_FILE, {"job_id": job.job_id, "sweep": str(sweep_dir),
                                                   "log": str(job.paths.stderr), "submitted_at": now})
            job_of[node.key] = job.job_id
            counts["submitted"] += 1
            history = ([old["job_id"]] + old.get("previous", [])) if old else []
            jobs[node.key] = {"job_id": job.job_id, "stage": node.stage, "cells": node.cells,
                              "deps": deps, "dir": str(node.dir),
                              "log": str(job.paths.stderr), "submitted_at": now, "previous": history}
            log.info("submitted %-10s job %s (after %s) -> %s", node.stage, job.job_id,
                     ",".join(after) or "nothing", node.dir)
        if counts["submitted"] or counts["shared"]:  # a rerun that only found its own queued jobs keeps its aggregate job
            after = sorted(set(job_of.values()), key=int)
            agg = submit_one(AggregateJob(), (Path(sweep_dir), run_root), "aggregate", f"aggregate-{Path(sweep_dir).name}",
                             "afterany:" + ":".join(after))
            jobs["aggregate"] = {"job_id": agg.job_id, "stage": "aggregate", "deps": list(job_of),
                                 "log": str(agg.paths.stderr), "submitted_at": now}
            log.info("submitted aggregate  job %s (after all of them)", agg.job_id)
    finally:  # ids of everything submitted so far are kept even if a later sbatch fails
        write_json(Path(sweep_dir) / JOBS_FILE, jobs)
    return counts


def launch(base: dict, order: list[Node], sweep_dir: Path, overrides: list[str]) -> int:
    """Entry point from benchmark.grid: 0 submitted (or nothing to do), 2 not submitted."""
    try:
        cfg = resolve(base["launcher"], overrides)
    except Exception as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    run_root = Path(base["run_root"]).resolve()
    todo = [n for n in order if not n.done()]
    if not todo:
        from benchmark import aggregate
        wide = aggregate.write_tables(sweep_dir, run_root)
        aggregate.tradeoff_plot(wide, sweep_dir / "tradeoff.png")
        log.info("%d stages in the grid: all done, nothing submitted; results table: %s", len(order),
                 sweep_dir / "results.md")
        return 0
    # The cost model's estimates: time limits for timeout_min=auto, and a profile whose limits
    # (with its requeues) cannot finish a stage is refused before anything is submitted.
    from benchmark import plan
    try:
        costs = plan.build_plan(base, todo, launcher=cfg)
        plan.check(costs)
    except ValueError as exc:
        log.error("not submitted: %s", exc)
        return 2
    why = controller_reachable()
    if why:
        log.error("cannot submit to SLURM: %s. Start the local test cluster with `sudo bash "
                  "slurm/start-slurm.sh`, or use launcher=local", why)
        return 2
    counts = submit(order, sweep_dir, run_root, cfg, {r.key: r.limit_min for r in costs["rows"]})
    log.info("%d stages in the grid: %d done, %d already queued or running, %d shared with another sweep's "
             "jobs, %d submitted", len(order), counts["done"], counts["reused"], counts["shared"], counts["submitted"])
    log.info("follow it with: python -m benchmark.status %s", sweep_dir)
    log.info("logs: %s/<job id>/; tables appear in %s when every job has ended", run_root / "slurm", sweep_dir)
    return 0
