"""What a finished sweep cost, from its stage records, against the time its grid is meant to take.

``python -m benchmark.perf --sweep <run_root>/sweeps/<name>`` reads every stage record of the
sweep (``record.json``: the last attempt's wall time and the host's CPU; ``attempts.json``: when
each attempt started and was last seen) and reports

- the work: the sum of the stages' wall times (seconds of one worker; local workers run one
  stage each, with the threads the launcher gave them), by stage kind, and what earlier attempts
  (killed, preempted, resumed) cost on top of it;
- the span, from the first attempt's start to the last stage's end: the sweep's wall time when it
  ran in one go (a sweep resumed over several sessions has no single wall time, and the report
  says so from the busy share, work / (span x workers));
- the longest chain of dependent stages, which no number of workers shortens;
- a replay of the launcher's own schedule (``benchmark.launch``: longest-path-first list
  scheduling, with the launcher's cost estimates as priorities) with the measured stage times on
  1, 2, 4, ... workers: what the same stages would take with more workers of the same speed;
- the verdict against the grid's ``budget`` (``{minutes, workers}``, e.g. issue #16's 15 minutes
  on this project's 2-core machine for ``grid=default``): the measured span where the sweep ran
  in one go, the replay otherwise, and the fewest workers whose replay fits the budget.

Speed targets are checked here, from what ran, never by a timed test. Stage times depend on the
host (the records name its CPU) and on what else ran beside them.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from benchmark.dag import longest_chains
from benchmark.launch import STAGE_COST
from benchmark.monitor import LEDGER_FILE, fmt_duration
from benchmark.stages import stage_names
from benchmark.store import read_json, write_json, write_text

log = logging.getLogger(__name__)

# A sweep whose stages kept its workers busy less than this share of its span did not run in one
# go (it was resumed, or waited on something else); its span is then not its wall time.
ONE_GO_BUSY = 0.75


def replay(order: list[str], deps: Mapping[str, Iterable[str]], duration: Mapping[str, float],
           priority: Mapping[str, float], workers: int) -> dict[str, tuple[float, float]]:
    """(start, end) of every stage when ``workers`` workers run the graph as the local launcher
    does: whenever a worker is free, start the ready stage of highest priority (ties in ``order``,
    a topological order); a stage is ready once all its dependencies in the graph have ended."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    pending = sorted(order, key=lambda k: -priority[k])  # stable: ties keep ``order``
    inside = set(order)
    ended: dict[str, float] = {}
    running: dict[str, float] = {}   # key -> end time
    times: dict[str, tuple[float, float]] = {}
    now = 0.0
    while pending or running:
        for k in list(pending):
            if len(running) >= workers:
                break
            if all(d in ended for d in deps[k] if d in inside):
                pending.remove(k)
                running[k] = now + duration[k]
                times[k] = (now, running[k])
        if not running:
            raise ValueError(f"stages {pending[:3]} wait on stages that never end: the graph has a cycle")
        now = min(running.values())
        for k in [k for k, t in running.items() if t == now]:
            ended[k] = now
            del running[k]
    return times


@dataclass
class StageRun:
    key: str
    stage: str
    deps: list[str]
    wall_s: float          # the last attempt, start to record
    all_attempts_s: float  # every attempt, as the ledger saw them
    attempts: int
    started: float         # epoch seconds, the first attempt
    ended: float           # epoch seconds, the last attempt's last sign of life
    host: str
    device_hours: float    # every attempt x its processes (GPUs), as the record states
    world_size: int        # processes of the last attempt (data parallel when > 1)


def _host(rec: dict) -> str:
    cpu = rec.get("cpu")
    if not cpu:
        return "not recorded"
    return f"{cpu['model']} ({cpu['family_model']}, {cpu['bf16_matmul_isa']})"


def read_sweep(sweep_dir: Path) -> tuple[dict, list[StageRun]]:
    """The sweep's config and one StageRun per distinct stage, in the launcher's order."""
    sweep_dir = Path(sweep_dir).resolve()
    if not (sweep_dir / "cells.json").exists():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no cells.json): pass "
                                "<run_root>/sweeps/<name>-<hash>, as benchmark.grid logs it")
    run_root = sweep_dir.parent.parent
    cells = read_json(sweep_dir / "cells.json")
    base = yaml.safe_load((sweep_dir / "config.yaml").read_text())
    rank = {s: i for i, s in enumerate(stage_names())}
    seen: dict[str, str] = {}
    for cell in cells:
        for stage, key in cell["nodes"].items():
            seen.setdefault(key, stage)
    missing, runs = [], []
    for key, stage in sorted(seen.items(), key=lambda kv: rank.get(kv[1], len(rank))):
        d = run_root / "stages" / stage / key
        if not (d / "record.json").exists():
            missing.append(str(d))
            continue
        rec = read_json(d / "record.json")
        ledger = read_json(d / LEDGER_FILE) if (d / LEDGER_FILE).exists() else []
        wall = float(rec["wall_time_s"])
        world = max(1, int(rec.get("world_size", 1)))
        everything = float(rec.get("device_hours", 0.0)) * 3600.0 / world
        started = min((a["started"] for a in ledger), default=math.nan)
        ended = max((a["last_seen"] for a in ledger), default=math.nan)
        runs.append(StageRun(key, stage, [k for k in rec.get("deps", {}).values()], wall,
                             max(everything, wall), len(ledger) or int(rec.get("attempts", 1)), started, ended,
                             _host(rec), float(rec.get("device_hours", 0.0)), world))
    if missing:
        raise ValueError(f"{len(missing)} of {len(seen)} stages of {sweep_dir.name} have no record yet (first: "
                         f"{missing[0]}): a sweep's cost is read once it has finished; "
                         f"`python -m benchmark.status {sweep_dir}` says where it stands")
    return base, _launch_order(cells, runs, rank)


def _launch_order(cells: list[dict], runs: list[StageRun], rank: dict[str, int]) -> list[StageRun]:
    """``runs`` in the order the launcher lists them (benchmark.dag.build: cell by cell, each
    node after its dependencies, depth first), which breaks the replay's ties as the launcher
    does. cells.json keeps a cell's nodes by name, so each cell's are taken in pipeline order."""
    by_key = {r.key: r for r in runs}
    out: list[StageRun] = []
    placed: set[str] = set()
    visiting: set[str] = set()

    def visit(key: str) -> None:
        if key in placed or key not in by_key:
            return
        if key in visiting:
            raise ValueError(f"the stage records' dependencies form a cycle through {key}")
        visiting.add(key)
        for d in by_key[key].deps:
            visit(d)
        visiting.discard(key)
        placed.add(key)
        out.append(by_key[key])

    for cell in cells:
        for stage, key in sorted(cell["nodes"].items(), key=lambda kv: rank.get(kv[0], len(rank))):
            visit(key)
    return out


GRID_DIR = Path(__file__).resolve().parent / "conf" / "grid"


def grid_budget(base: dict, from_file: bool = True) -> dict | None:
    """The grid's ``budget: {minutes, workers}``, checked; None when the grid states none. With
    ``from_file``, a sweep written before grids stated budgets takes its grid's current file's
    (same name); a config being composed (config.validate) has its grid file's already."""
    grid = base.get("grid") or {}
    b = grid.get("budget")
    if b is None and from_file and (GRID_DIR / f"{grid.get('name')}.yaml").exists():
        b = (yaml.safe_load((GRID_DIR / f"{grid['name']}.yaml").read_text()) or {}).get("budget")
    if b is None:
        return None
    try:
        minutes, workers = float(b["minutes"]), int(b["workers"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"grid.budget must be {{minutes: <number>, workers: <int>}}, got {b!r}") from None
    if minutes <= 0 or workers < 1:
        raise ValueError(f"grid.budget needs minutes > 0 and workers >= 1, got {b!r}")
    return {"minutes": minutes, "workers": workers}


def analyse(base: dict, runs: list[StageRun], workers: list[int], budget: dict | None = None) -> dict[str, Any]:
    # The launcher's priorities (its estimates per stage kind), so the replay is its schedule.
    order = [r.key for r in runs]
    deps = {r.key: r.deps for r in runs}
    dur = {r.key: r.wall_s for r in runs}
    prio = longest_chains(deps, {r.key: STAGE_COST.get(r.stage, 1.0) for r in runs})
    chain_from = longest_chains(deps, dur)
    # The longest chain itself: from its first stage, follow the costliest dependant each time.
    children = defaultdict(list)
    for r in runs:
        for d in r.deps:
            children[d].append(r.key)
    stage_of = {r.key: r.stage for r in runs}
    k = max(chain_from, key=chain_from.get)
    chain = [k]
    while children[k]:
        k = max(children[k], key=chain_from.get)
        chain.append(k)
    work = sum(dur.values())
    budget = budget or grid_budget(base)
    counts = sorted(set(workers) | ({budget["workers"]} if budget else set()))
    ends_at: dict[int, float] = {}

    def makespan(n: int) -> float:
        """When the replay on ``n`` workers ends (each worker count replayed once)."""
        if n not in ends_at:
            ends_at[n] = max(end for _, end in replay(order, deps, dur, prio, n).values())
        return ends_at[n]

    replays = {w: makespan(w) for w in counts}
    starts = [r.started for r in runs if math.isfinite(r.started)]
    ends = [r.ended for r in runs if math.isfinite(r.ended)]
    span = max(ends) - min(starts) if starts and ends else math.nan
    kinds: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        kinds[r.stage].append(r.wall_s)
    out: dict[str, Any] = {
        "sweep": base.get("grid", {}).get("name", "?"), "stages": len(runs),
        "hosts": dict(Counter(r.host for r in runs)),
        "work_s": work, "earlier_attempts_s": sum(r.all_attempts_s - r.wall_s for r in runs),
        "restarted_stages": sum(r.attempts > 1 for r in runs),
        "device_hours": sum(r.device_hours for r in runs),
        "multi_process_stages": sum(r.world_size > 1 for r in runs),
        "span_s": span, "longest_chain_s": chain_from[chain[0]],
        "longest_chain": [f"{stage_of[c]} ({dur[c]:.0f} s)" for c in chain],
        "replay_s": {str(w): t for w, t in replays.items()},
        "lower_bound_s": {str(w): max(work / w, chain_from[chain[0]]) for w in counts},
        "by_stage": {s: {"stages": len(v), "total_s": sum(v), "median_s": statistics.median(v), "max_s": max(v)}
                     for s, v in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))},
        "budget": budget,
    }
    if budget:
        w, limit = budget["workers"], 60.0 * budget["minutes"]
        busy = work / (span * w) if math.isfinite(span) and span > 0 else 0.0
        one_go = busy >= ONE_GO_BUSY
        measured = span if one_go else replays[w]
        fewest = next((n for n in range(1, 65) if max(work / n, chain_from[chain[0]]) <= limit
                       and makespan(n) <= limit), None)
        out["verdict"] = {"workers": w, "budget_s": limit, "busy_share": busy, "ran_in_one_go": one_go,
                          "judged_s": measured, "judged_by": "measured span" if one_go else "replay",
                          "meets": measured <= limit, "ratio": measured / limit, "fewest_workers": fewest}
    return out


def to_markdown(r: dict[str, Any], sweep_dir: Path) -> str:
    hosts = "; ".join(f"{h} ({n} stages)" for h, n in r["hosts"].items())
    md = [f"# Sweep cost: {Path(sweep_dir).name}", "",
          f"`python -m benchmark.perf --sweep <run_root>/sweeps/{Path(sweep_dir).name}`, from its {r['stages']} "
          "stage records. "
          f"Hosts: {hosts}. Seconds are one worker's (one stage at a time, the launcher's threads).", ""]
    v = r.get("verdict")
    if v:
        md += [f"**Budget ({v['workers']} workers, {fmt_duration(v['budget_s'])}): "
               f"{'met' if v['meets'] else 'missed'}**, {fmt_duration(v['judged_s'])} by the "
               f"{v['judged_by']} ({v['ratio']:.2f}x the budget; busy share {v['busy_share']:.0%}"
               f"{'' if v['ran_in_one_go'] else ', so the sweep did not run in one go and its span is not its wall time'}"
               f"). Fewest workers of the same speed whose replay fits: "
               f"{v['fewest_workers'] if v['fewest_workers'] else 'none up to 64 (the longest chain or the work is too long)'}.",
               ""]
    else:
        md += ["The grid states no `budget`: no verdict.", ""]
    md += ["| measure | value |", "|---|---|",
           f"| work (sum of stage wall times) | {r['work_s']:,.0f} s ({fmt_duration(r['work_s'])}) |",
           f"| earlier attempts ({r['restarted_stages']} stages restarted) | {r['earlier_attempts_s']:,.0f} s |",
           f"| device-hours (every attempt x its processes) | {r['device_hours']:.2f} |",
           f"| span, first start to last end | {fmt_duration(r['span_s'])} |",
           f"| longest chain | {fmt_duration(r['longest_chain_s'])}: {' -> '.join(r['longest_chain'])} |"]
    for w, t in r["replay_s"].items():
        md.append(f"| replay on {w} worker(s) (lower bound) | {fmt_duration(t)} "
                  f"({fmt_duration(r['lower_bound_s'][w])}) |")
    if r["multi_process_stages"]:
        md += ["", f"{r['multi_process_stages']} stages ran on several processes (data parallel): the work and the "
               "replay count their wall time once, as one worker's; the device-hours count every process."]
    md += ["", "| stage kind | stages | total (s) | share | median (s) | max (s) |", "|---|---|---|---|---|---|"]
    for s, k in r["by_stage"].items():
        md.append(f"| {s} | {k['stages']} | {k['total_s']:,.0f} | {k['total_s'] / r['work_s']:.0%} | "
                  f"{k['median_s']:.0f} | {k['max_s']:.0f} |")
    return "\n".join(md) + "\n"


def report(sweep_dir: Path, out_dir: Path, workers: list[int], budget: dict | None = None) -> dict[str, Any]:
    base, runs = read_sweep(sweep_dir)
    r = analyse(base, runs, workers, budget)
    name = Path(sweep_dir).resolve().name
    write_json(out_dir / f"sweep_{name}.json", r)
    md = to_markdown(r, sweep_dir)
    write_text(out_dir / f"sweep_{name}.md", md)
    log.info("%s", md)
    log.info("wrote %s", out_dir / f"sweep_{name}.md")
    return r
