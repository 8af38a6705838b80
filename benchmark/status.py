"""``python -m benchmark.status <sweep_dir> [--json]``: where every cell and stage of a sweep is.

Each stage is one of pending, running, done or failed, decided from its run directory
(record.json = done, failed.json = failed) and, for sweeps submitted with launcher=slurm, from
SLURM itself (the job ids in ``<sweep_dir>/slurm_jobs.json``, queried with squeue and sacct).
A failed stage names its reason and its log; a stage whose input failed is failed too (SLURM
cancelled it), with that input as the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmark.stages import stage_names
from benchmark.launch_slurm import is_active, job_states, load_jobs
from benchmark.monitor import PROGRESS_FILE, fmt_duration, progress_of
from benchmark.store import read_json

STATES = ("pending", "running", "done", "failed")


# A local stage (no SLURM job) counts as running while its progress.json is this fresh.
FRESH_S = 600


def _progress(d: Path) -> dict | None:
    """Step, total and ETA of a training stage from its progress.json (benchmark/monitor.py)."""
    prog = progress_of(d)
    if prog is None:
        return None
    age = time.time() - (d / PROGRESS_FILE).stat().st_mtime
    return {"step": prog["step"], "total": prog["total"], "eta_s": prog.get("eta_s"), "age_s": age}


def _node_state(d: Path, job: dict | None, slurm: str | None) -> dict:
    out: dict = {"dir": str(d), "job_id": job["job_id"] if job else None, "slurm_state": slurm}
    if (d / "record.json").exists():
        rec = read_json(d / "record.json")
        return {**out, "state": "done", "device_hours": rec.get("device_hours"), "attempts": rec.get("attempts", 1)}
    prog = _progress(d)
    if prog is not None:
        out["progress"] = prog
        if not job and prog["age_s"] < FRESH_S and not (d / "failed.json").exists():
            return {**out, "state": "running", "detail": ""}
    if is_active(slurm):
        running = slurm.split()[0] in ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT")
        return {**out, "state": "running" if running else "pending",
                "detail": slurm if not running else "", "log": job["log"]}
    if (d / "failed.json").exists():
        f = read_json(d / "failed.json")
        return {**out, "state": "failed", "reason": f["reason"], "log": f.get("slurm_log") or f["log"],
                "stage_log": f["log"]}
    if job and slurm:  # the job ended without a record: killed, cancelled, out of time or memory
        return {**out, "state": "failed", "reason": f"SLURM job {job['job_id']} ended {slurm}",
                "log": job["log"]}
    if job:
        return {**out, "state": "pending", "detail": f"job {job['job_id']} unknown to SLURM", "log": job["log"]}
    return {**out, "state": "pending", "detail": "not submitted"}


def _in_order(stage_keys: dict[str, str]) -> list[str]:
    """A cell's node keys in dependency order (cells.json stores them sorted by name)."""
    return [stage_keys[s] for s in stage_names() if s in stage_keys]


def collect(sweep_dir: Path) -> dict:
    sweep_dir = Path(sweep_dir).resolve()
    run_root = sweep_dir.parent.parent  # <run_root>/sweeps/<name>
    cells = read_json(sweep_dir / "cells.json")
    jobs = load_jobs(sweep_dir)
    slurm = job_states([j["job_id"] for j in jobs.values()])
    nodes: dict[str, dict] = {}
    for cell in cells:
        for stage, key in cell["nodes"].items():
            if key not in nodes:
                job = jobs.get(key)
                nodes[key] = {"stage": stage, **_node_state(run_root / "stages" / stage / key, job,
                                                            slurm.get(job["job_id"]) if job else None)}
    # A stage that waits on a failed input never runs (SLURM cancels it): failed, naming the input.
    for cell in cells:
        for key in _in_order(cell["nodes"]):
            n = nodes[key]
            bad = [d for d in jobs.get(key, {}).get("deps", []) if nodes.get(d, {}).get("state") == "failed"]
            ended_or_waiting = n["state"] == "pending" or n.get("reason", "").startswith("SLURM job")
            if bad and ended_or_waiting:
                cause = nodes[bad[0]].get("cause", bad[0])  # the stage that failed first, not its victims
                n.update(state="failed", cause=cause, reason=f"input {nodes[cause]['stage']} failed ({cause})",
                         log=nodes[cause].get("log"))
    agg = jobs.get("aggregate")
    out = {"sweep": str(sweep_dir), "cells": [], "nodes": nodes,
           "counts": {s: sum(n["state"] == s for n in nodes.values()) for s in STATES}}
    if agg:
        out["aggregate"] = {"job_id": agg["job_id"], "slurm_state": slurm.get(agg["job_id"]),
                            "log": agg["log"]}
    for cell in cells:
        states = [nodes[k]["state"] for k in cell["nodes"].values()]
        overall = ("failed" if "failed" in states else "done" if all(s == "done" for s in states)
                   else "running" if "running" in states or "done" in states else "pending")
        out["cells"].append({"label": cell["label"], "state": overall,
                             "stages": {nodes[k]["stage"]: k for k in _in_order(cell["nodes"])}})
    return out


def render(st: dict) -> str:
    c = st["counts"]
    lines = [f"sweep {st['sweep']}",
             f"{len(st['nodes'])} stages: " + ", ".join(f"{c[s]} {s}" for s in STATES)]
    for cell in st["cells"]:
        lines.append(f"\n{cell['label']}: {cell['state']}")
        for stage, key in cell["stages"].items():
            n = st["nodes"][key]
            job = f"job {n['job_id']}" if n.get("job_id") else ""
            extra = n.get("detail") or ""
            if n["state"] == "failed":
                extra = f"{n['reason']}  (log: {n.get('log')})"
            if n["state"] == "running" and n.get("progress"):
                pg = n["progress"]
                eta = fmt_duration(pg["eta_s"]) if pg.get("eta_s") is not None else "?"
                extra = f"step {pg['step']}/{pg['total']}, ETA {eta} {extra}".rstrip()
            if n["state"] == "done" and n.get("device_hours") is not None:
                extra = f"{n['device_hours']:.3g} device-h over {n.get('attempts', 1)} attempt(s)"
            lines.append(f"  {stage:<10} {n['state']:<8} {job:<10} {extra}".rstrip())
    if "aggregate" in st:
        a = st["aggregate"]
        lines.append(f"\ntables: job {a['job_id']} {a['slurm_state'] or 'unknown'} (log: {a['log']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.status", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="runs/sweeps/<grid>-<hash>")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    args = p.parse_args(argv)
    if not (args.sweep_dir / "cells.json").exists():
        p.error(f"{args.sweep_dir} is not a sweep directory (no cells.json); sweeps are in <run_root>/sweeps/")
    st = collect(args.sweep_dir)
    print(json.dumps(st, indent=2) if args.json else render(st))  # the command's output, not progress
    return 0


if __name__ == "__main__":
    sys.exit(main())
