"""``python -m benchmark.grid [hydra overrides]``: run a prior sweep end to end.

With no arguments it runs the embedded default (grid=default on Fashion-MNIST, local
launcher). Every stage of every cell lands in a content-addressed run directory below
``run_root``; finished stages are skipped, so rerunning finishes in seconds and an interrupted
run continues where it stopped. The sweep directory gets the resolved config, the results
tables and the trade-off plot.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import yaml

from benchmark import aggregate, config, dag
from benchmark.launch import run_local
from benchmark.store import stable_hash, write_json, write_text

log = logging.getLogger("benchmark.grid")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL", "torch_fidelity"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare(overrides: list[str]) -> tuple[dict, list[config.Cell], list[dag.Node], list[dict], Path]:
    base, cells = config.load(overrides)
    run_root = Path(base["run_root"]).resolve()
    order, per_cell = dag.build(cells, run_root)
    ident = stable_hash([[n.key for n in m.values()] for m in per_cell], 10)
    sweep_dir = run_root / "sweeps" / f"{base['grid']['name']}-{ident}"
    cells_json = [{"label": c.label, "keys": c.keys, "nodes": {s: n.key for s, n in m.items()}}
                  for c, m in zip(cells, per_cell)]
    write_text(sweep_dir / "config.yaml", yaml.safe_dump(base, sort_keys=False))
    write_json(sweep_dir / "cells.json", cells_json)
    write_text(sweep_dir / "cell_configs.yaml", yaml.safe_dump_all([c.cfg for c in cells], sort_keys=False))
    write_json(sweep_dir / "overrides.json", overrides)
    return base, cells, order, per_cell, sweep_dir


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    overrides = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    try:
        base, cells, order, per_cell, sweep_dir = prepare(overrides)
    except Exception as exc:  # a bad config is reported before any work starts
        log.error("invalid configuration: %s", exc)
        return 2
    log.info("sweep %s: %d cells, %d stages -> %s", base["grid"]["name"], len(cells), len(order), sweep_dir)
    launcher = base["launcher"]["name"]
    if launcher == "slurm":  # submits the stages as SLURM jobs and returns
        from benchmark.launch_slurm import launch
        return launch(base, order, sweep_dir, overrides)
    if launcher != "local":
        log.error("launcher %r is not available in this build; use launcher=local", launcher)
        return 2
    try:
        from benchmark.launch import resolve_workers
        status = run_local(order, *resolve_workers(base["launcher"]))
    except KeyboardInterrupt:
        # Finished stages and the running stage's last checkpoint are on disk already.
        log.warning("interrupted: rerun the same command to continue where this run stopped")
        return 130
    wide = aggregate.write_tables(sweep_dir, Path(base["run_root"]).resolve())
    aggregate.tradeoff_plot(wide, sweep_dir / "tradeoff.png")
    failed = [k for k, s in status.items() if s != "done"]
    log.info("finished in %.1fs", time.perf_counter() - t0)
    log.info("results table: %s", sweep_dir / "results.md")
    log.info("results CSV:   %s", sweep_dir / "results.csv")
    log.info("trade-off plot: %s", sweep_dir / "tradeoff.png")
    if failed:
        log.error("%d stages did not finish: %s", len(failed), ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
