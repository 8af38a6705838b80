"""``python -m benchmark.export <sweep_dir> <dest>``: copy a sweep's results into results/.

The destination holds everything the figures and the report need, with no run directories:
the tables, the resolved configs, and per cell its stage records, logs and image grids:

    <dest>/results.csv, results_long.csv, results_over_seeds.csv, results.md, results.tex, tradeoff.png,
           config.yaml, cell_configs.yaml, cells.json
    <dest>/cells/<cell_id>/<stage>.json        the stage's record (facts, wall time)
    <dest>/cells/<cell_id>/<stage>.log         the stage's log
    <dest>/cells/<cell_id>/config.yaml         the cell's resolved config
    <dest>/cells/<cell_id>/samples.png, reconstructions.png
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from benchmark.store import read_json, write_bytes, write_json

log = logging.getLogger("benchmark.export")
SWEEP_FILES = ("results.csv", "results_long.csv", "results_over_seeds.csv", "results.md", "results.tex",
               "tradeoff.png", "config.yaml", "cell_configs.yaml", "cells.json")
IMAGES = {"gen_eval": "samples.png", "recon_eval": "reconstructions.png"}
# Training curves the figures draw (benchmark/figures.py reads them from cells/<cell_id>/ too).
CURVES = {"tokenizer": "latent_curve.json", "teacher": "teacher_curve.json"}


PAPER_DIR = "paper"  # results/paper holds the paper's tables, not a sweep


def find_sweeps(results: Path) -> list[Path]:
    """Exported sweep folders: those with results.csv and cells.json (results/paper is not one)."""
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist; export a sweep first "
                                "(python -m benchmark.export runs/sweeps/<sweep> results/<name>)")
    return sorted(d for d in results.iterdir()
                  if d.is_dir() and d.name != PAPER_DIR and (d / "results.csv").exists() and (d / "cells.json").exists())


def cell_id(keys: dict) -> str:
    raw = f"{keys['prior']}-{keys['loss']}-l{keys['lambda']:g}-{keys['tokenizer']}-{keys['generator']}-s{keys['seed']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        write_bytes(dst, src.read_bytes())


def export(sweep_dir: Path, dest: Path, run_root: Path | None = None) -> Path:
    run_root = run_root or sweep_dir.resolve().parent.parent
    dest.mkdir(parents=True, exist_ok=True)
    for name in SWEEP_FILES:
        _copy(sweep_dir / name, dest / name)
    cells = read_json(sweep_dir / "cells.json")
    for cell in cells:
        cid = cell_id(cell["keys"])
        out = dest / "cells" / cid
        for stage, key in cell["nodes"].items():
            d = run_root / "stages" / stage / key
            _copy(d / "record.json", out / f"{stage}.json")
            _copy(d / "failed.json", out / f"{stage}.failed.json")
            _copy(d / "stage.log", out / f"{stage}.log")
            if stage in IMAGES:
                _copy(d / IMAGES[stage], out / IMAGES[stage])
            if stage in CURVES:
                _copy(d / CURVES[stage], out / CURVES[stage])
            if stage == "tokenizer":
                _copy(d / "config.yaml", out / "config.yaml")
        cell["cell_id"] = cid
    write_json(dest / "cells.json", cells)
    log.info("exported %d cells to %s", len(cells), dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(a.sweep_dir, a.dest)


if __name__ == "__main__":
    main()
