"""Launchers. ``local`` runs the stage DAG in this process in dependency order.

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

from benchmark.dag import Node
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
    handler = _stage_log(node)
    t0 = time.perf_counter()
    try:
        facts = runner(node.stage)(node)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    wall = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"stage": node.stage, "key": node.key, "deps": {r: d.key for r, d in node.deps.items()},
              "facts": facts, "wall_time_s": wall,
              # device-hours: accelerator hours on GPU, core-hours' wall equivalent on CPU.
              "device_hours": wall / 3600.0, "device": device, "host": socket.gethostname(),
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


def run_local(order: list[Node]) -> dict[str, str]:
    """Run every unfinished node; returns key -> done | failed | blocked."""
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


def _headline(facts: dict) -> str:
    keys = ("psnr", "ssim", "rfid", "gfid", "latent_swd_to_prior", "n_ref")
    return " ".join(f"{k}={facts[k]:.4g}" for k in keys if isinstance(facts.get(k), (int, float)))

