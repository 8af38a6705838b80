"""``python -m benchmark.run_stage [hydra overrides] --stage generator``: run one stage of one
cell, optionally data-parallel:

    torchrun --nproc_per_node=2 -m benchmark.run_stage --stage generator generator=cpu-small
    srun --ntasks=8 --gpus-per-task=1 python -m benchmark.run_stage --stage generator ...

The config is composed exactly as ``benchmark.grid`` composes it (grid=single unless the
overrides name a one-cell grid), so the stage lands in the same content-addressed directory and
the grid later counts it as done. The stage's dependencies must be finished already (run them
with the grid or with this command, single process). Under torchrun or SLURM every rank runs the
stage; only rank 0 writes files (config, record, checkpoints, outputs). Without a launcher this is
a plain single process and creates no process group.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmark import config, dag, distributed
from benchmark.dag import Node
from benchmark.launch import run_node, write_failure
from benchmark.stages import runner, stage_names
from benchmark.upstream import STAGES

log = logging.getLogger("benchmark.run_stage")


def select_node(overrides: list[str], stage: str) -> Node:
    if not any(o.split("=", 1)[0].lstrip("+~") == "grid" for o in overrides):
        overrides = ["grid=single", *overrides]
    base, cells = config.load(overrides)
    if len(cells) != 1:
        raise ValueError(f"run_stage runs one cell, but the grid {base['grid']['name']!r} has {len(cells)} "
                         f"(cells x seeds); use grid=single with overrides for the cell you want")
    _, per_cell = dag.build(cells, Path(base["run_root"]).resolve())
    if stage not in per_cell[0]:
        raise KeyError(f"stage {stage!r} is not in this cell; its stages: {', '.join(per_cell[0])}")
    return per_cell[0][stage]


def run_one(node: Node, info: distributed.DistInfo) -> dict | None:
    """Run `node` on this rank; rank 0 goes through run_node, which writes config and record."""
    if info.distributed and not STAGES.get(node.stage).distributed:
        multi = ", ".join(s for s in stage_names() if STAGES.get(s).distributed)
        raise ValueError(f"stage {node.stage!r} runs in one process only; launch it without torchrun/srun "
                         f"tasks (data-parallel stages: {multi})")
    if info.is_main:
        return run_node(node)
    runner(node.stage)(node)  # the stage itself writes only on rank 0
    return None


def main(argv: list[str] | None = None) -> int:
    from benchmark.logs import setup_logging
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m benchmark.run_stage", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, help=f"one of: {', '.join(stage_names())}")
    p.add_argument("overrides", nargs="*", help="hydra overrides, as for benchmark.grid")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        node = select_node(args.overrides, args.stage)
    except Exception as exc:  # a bad config is reported before any process group exists
        log.error("invalid configuration: %s", exc)
        return 2
    if node.done():
        log.info("%s is already done: %s", node.stage, node.record_path)
        return 0
    missing = [f"{role} ({d.dir})" for role, d in node.deps.items() if not d.done()]
    if missing:
        log.error("%s needs finished %s; run them first (python -m benchmark.run_stage --stage <name> "
                  "with the same overrides, or python -m benchmark.grid)", node.stage, ", ".join(missing))
        return 2
    info = distributed.init_from_env(node.cfg.get("device", "auto"))
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the log, from rank 0
    try:
        log.info("%s on %d process(es), device %s -> %s", node.stage, info.world_size, info.device, node.dir)
        rec = run_one(node, info)
        distributed.finish()  # nobody exits before rank 0 has written the record
    except Exception as exc:
        if info.is_main:
            write_failure(node, exc)
        log.error("%s FAILED on rank %d: %s", node.stage, info.rank, exc)
        return 1
    finally:
        distributed.cleanup()
    if rec is not None:
        log.info("%s done in %.1fs -> %s", node.stage, rec["wall_time_s"], node.record_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
