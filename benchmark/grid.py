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
from benchmark.logs import setup_logging
from benchmark.store import stable_hash, write_json, write_text

log = logging.getLogger("benchmark.grid")


def prepare(overrides: list[str], missing: list[str] | None = None
            ) -> tuple[dict, list[config.Cell], list[dag.Node], list[dict], Path]:
    base, cells = config.load(overrides, missing)
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


FLAGS = """\
Flags (hydra's conventions; everything else is a hydra override):
  -h, --help          this help: the config groups, their options, the flags
  --cfg job           print every cell's resolved config (YAML) and exit; nothing runs or is written
  -m, --multirun      accepted for hydra compatibility: comma sweeps expand with or without it
  --plan              submit and run nothing: list every stage job (cells, resources, dependencies,
                      done/shared/to run) with its GPU-hours from the cost model (benchmark/plan.py);
                      writes plan.md and plan.json to the sweep directory
  --gpu NAME          the plan's GPU (h100 | h200 | a100; default h100)
  --mfu X             the plan's model-FLOPs utilisation (default: a measured one, else 0.40)

Overrides:
  group=option        pick a preset of a group, e.g. prior=gmm tokenizer=cpu-small
  key=value           set a value, e.g. loss.lambda=10 eval.n_samples=5000 run_root=/scratch/runs
  ++key=value         add or set a key that the preset does not declare
  key=a,b,c           comma sweep: the product of all swept keys, applied to every grid cell,
                      e.g. prior=gaussian,gmm loss.lambda=1,10 (4 combinations)
"""


def help_text() -> str:
    """The config groups with their options (read from the config tree) and the flags."""
    from importlib import resources
    conf = resources.files("benchmark.conf")
    lines = ["python -m benchmark.grid [flags] [overrides]: run a prior sweep end to end.", "",
             "Config groups (group=option; the default in brackets):"]
    defaults = {}
    for entry in yaml.safe_load(conf.joinpath("config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")):
        options = sorted(f.name[:-5] for f in conf.joinpath(group).iterdir() if f.name.endswith(".yaml"))
        shown = [f"[{o}]" if o == defaults.get(group) else o for o in options]
        lines.append(f"  {group:<10} {' '.join(shown)}")
    return "\n".join(lines) + "\n\n" + FLAGS


def parse_flags(args: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Split the suite's flags from hydra overrides. Unknown flags are an error (a mistyped
    flag would otherwise reach hydra's override parser as a confusing lexer error)."""
    flags: dict[str, str | bool] = {}
    overrides: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a in ("-m", "--multirun"):
            flags["multirun"] = True
        elif a == "--cfg" or a.startswith("--cfg="):
            what = a.split("=", 1)[1] if "=" in a else next(it, "")
            if what not in ("job", "all"):
                raise ValueError(f"--cfg takes 'job' (or 'all'), got {what!r}")
            flags["cfg"] = what
        elif a == "--plan":
            flags["plan"] = True
        elif a in ("--gpu", "--mfu") or a.startswith(("--gpu=", "--mfu=")):
            name, value = (a.split("=", 1) if "=" in a else (a, next(it, "")))
            if not value:
                raise ValueError(f"{name} takes a value")
            if name == "--mfu":
                try:
                    mfu = float(value)
                except ValueError:
                    raise ValueError(f"--mfu takes a number in (0, 1], got {value!r}") from None
                if not 0 < mfu <= 1:
                    raise ValueError(f"--mfu takes a number in (0, 1], got {value!r}")
            flags[name[2:]] = value
        elif a.startswith("-"):
            raise ValueError(f"unknown flag {a!r}. Flags: --help, --cfg job, --multirun, --plan, --gpu, --mfu")
        else:
            overrides.append(a)
    return flags, overrides


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        flags, overrides = parse_flags(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if flags.get("help"):
        sys.stdout.write(help_text())
        return 0
    t0 = time.perf_counter()
    if flags.get("cfg"):
        try:
            _, cells = config.load(overrides)
        except Exception as exc:
            log.error("invalid configuration: %s", exc)
            return 2
        for cell in cells:
            sys.stdout.write(f"# cell {cell.label}\n")
            sys.stdout.write(yaml.safe_dump(cell.cfg, sort_keys=False))
            sys.stdout.write("---\n")
        return 0
    planning = bool(flags.get("plan") or flags.get("gpu") or flags.get("mfu"))
    missing: list[str] | None = [] if planning else None  # a plan lists absent data/weights instead
    try:
        base, cells, order, per_cell, sweep_dir = prepare(overrides, missing)
    except Exception as exc:  # a bad config is reported before any work starts
        log.error("invalid configuration: %s", exc)
        return 2
    log.info("sweep %s: %d cells, %d stages -> %s", base["grid"]["name"], len(cells), len(order), sweep_dir)
    if planning:
        return _plan(base, order, sweep_dir, overrides, flags, missing or [])
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


def _plan(base: dict, order: list[dag.Node], sweep_dir: Path, overrides: list[str], flags: dict,
          missing: list[str]) -> int:
    """--plan: the stage jobs and their cost; nothing is submitted or run."""
    from benchmark import plan
    try:
        launcher = None
        if base["launcher"]["name"] == "slurm":  # the profile's resources, as a submission would use
            from benchmark.launch_slurm import resolve
            launcher = resolve(base["launcher"], overrides)
        p = plan.build_plan(base, order, launcher, gpu=str(flags.get("gpu") or plan.DEFAULT_GPU),
                            mfu=float(flags["mfu"]) if flags.get("mfu") else None, missing=missing)
        md = plan.write(p, sweep_dir)
        plan.check(p)
    except ValueError as exc:
        log.error("plan: %s", exc)
        return 2
    sys.stdout.write(md)
    log.info("plan written to %s and %s; nothing was submitted", sweep_dir / "plan.md", sweep_dir / "plan.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
