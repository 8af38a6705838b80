"""Build the tidy results table of a sweep from its stage records.

Long form (one row per cell x metric) is the source of truth; the wide table (one row per
cell) and the Markdown rendering are views of it. Missing or failed stages give empty cells
and a ``status`` column, never invented numbers.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.store import read_json, write_text

log = logging.getLogger(__name__)

KEY_COLS = ["dataset", "prior", "loss", "lambda", "tokenizer", "generator", "seed"]
METRICS = ["rfid", "psnr", "ssim", "gfid", "kid", "is", "precision", "recall", "fd_mobilenet_v2",
           "rfd_mobilenet_v2", "n_samples",
           "n_ref", "latent_swd_to_prior", "dm_teacher", "detector", "ref_features_sha256"]
STAGES_TIMED = ["ssl_backbone", "reference", "teacher", "tokenizer", "recon_eval", "generator", "gen_eval"]


def cell_rows(cells: list[dict[str, Any]], run_root: Path) -> pd.DataFrame:
    """cells: entries of the sweep's cells.json ({"keys": ..., "nodes": {stage: key}})."""
    rows = []
    for cell in cells:
        row: dict[str, Any] = dict(cell["keys"])
        states = []
        for stage, key in cell["nodes"].items():
            d = run_root / "stages" / stage / key
            if (d / "record.json").exists():
                rec = read_json(d / "record.json")
                for k, v in rec["facts"].items():
                    row.setdefault(k, v)
                if stage in STAGES_TIMED:
                    row[f"wall_s_{stage}"] = rec["wall_time_s"]
                    row[f"device_h_{stage}"] = rec["device_hours"]
                states.append("done")
            elif (d / "failed.json").exists():
                states.append("failed")
                row.setdefault("failure", f"{stage}: {read_json(d / 'failed.json')['reason']}")
            else:
                states.append("pending")
        row["status"] = "failed" if "failed" in states else ("done" if all(s == "done" for s in states) else "incomplete")
        rows.append(row)
    df = pd.DataFrame(rows)
    for m in METRICS:
        if m not in df:
            df[m] = None
    return df


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    value_cols = [c for c in wide.columns if c not in KEY_COLS]
    long = wide.melt(id_vars=KEY_COLS, value_vars=value_cols, var_name="metric", value_name="value")
    return long.dropna(subset=["value"])


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(df: pd.DataFrame, cols: list[str]) -> str:
    # Optional metrics nobody computed (e.g. fd_mobilenet_v2 without the extra detector) would be
    # columns of dashes: leave them out; key columns always stay.
    cols = [c for c in cols if c in df.columns and (c in KEY_COLS or c == "status" or df[c].notna().any())]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


SUMMARY = KEY_COLS + ["status", "rfid", "psnr", "ssim", "gfid", "kid", "precision", "recall",
                      "rfd_mobilenet_v2", "fd_mobilenet_v2",
                      "latent_swd_to_prior", "n_samples", "n_ref", "dm_teacher", "backbone_weights"]


SEED_METRICS = ["rfid", "psnr", "ssim", "gfid", "kid", "precision", "recall"]


def over_seeds(wide: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each (dataset, prior, loss, lambda, presets) group."""
    keys = [k for k in KEY_COLS if k != "seed"]
    done = wide[wide["status"] == "done"].copy()
    rows = []
    for key, grp in done.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        row["n_seeds"] = len(grp)
        for m in SEED_METRICS:
            vals = pd.to_numeric(grp[m], errors="coerce").dropna()
            row[m] = vals.mean() if len(vals) else None
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else None
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: Any, std: Any) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def seeds_markdown(summary: pd.DataFrame) -> str:
    keys = [k for k in KEY_COLS if k != "seed"] + ["n_seeds"]
    lines = ["| " + " | ".join(keys + SEED_METRICS) + " |", "|" + "---|" * (len(keys) + len(SEED_METRICS))]
    for _, r in summary.iterrows():
        cells = [_fmt(r[k]) for k in keys] + [_pm(r[m], r[f"{m}_std"]) for m in SEED_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(sweep_dir: Path, run_root: Path) -> pd.DataFrame:
    cells = read_json(sweep_dir / "cells.json")
    wide = cell_rows(cells, run_root)
    buf = wide.to_csv(index=False)
    write_text(sweep_dir / "results.csv", buf)
    write_text(sweep_dir / "results_long.csv", to_long(wide).to_csv(index=False))
    summary = over_seeds(wide)
    write_text(sweep_dir / "results_over_seeds.csv", summary.to_csv(index=False))
    md = "# Results\n\n## Per cell\n\n" + markdown(wide, SUMMARY)
    md += "\n## Mean ± std over seeds (finished cells)\n\n" + seeds_markdown(summary)
    md += ("\nFID values use the sample counts in `n_samples`/`n_ref` and the detector in "
           "results.csv; compare them only at equal counts.\n")
    write_text(sweep_dir / "results.md", md)
    cols = [c for c in SUMMARY if c in wide.columns]
    write_text(sweep_dir / "results.tex", wide[cols].to_latex(index=False, na_rep="--", float_format="%.4g"))
    return wide


def tradeoff_plot(wide: pd.DataFrame, path: Path, recon: str = "rfid") -> None:
    """Reconstruction metric against gFID, one labelled point per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from benchmark.store import save_figure

    sns.set_theme(style="whitegrid", context="paper")
    ok = wide.dropna(subset=[recon, "gfid"])
    fig, ax = plt.subplots(figsize=(5, 4))
    if len(ok):
        label = ok["prior"] + "/" + ok["loss"]
        sns.scatterplot(x=ok["gfid"].astype(float), y=ok[recon].astype(float), hue=label, s=80, ax=ax)
        for (_, r), lab in zip(ok.iterrows(), label):
            ax.annotate(f"{lab} s{r['seed']}", (float(r["gfid"]), float(r[recon])), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    else:
        ax.text(0.5, 0.5, "no finished cells yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("gFID (lower: easier to generate)")
    ax.set_ylabel({"rfid": "rFID (lower: better reconstruction)", "psnr": "PSNR (dB)"}.get(recon, recon))
    ax.set_title("Reconstruction vs generation")
    fig.tight_layout()
    save_figure(path, fig, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Rebuild a sweep's tables and trade-off plot from its records.")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--run-root", type=Path, default=None, help="default: two levels above sweep_dir")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_root = a.run_root or a.sweep_dir.resolve().parent.parent
    wide = write_tables(a.sweep_dir, run_root)
    tradeoff_plot(wide, a.sweep_dir / "tradeoff.png")
    log.info("wrote %s", a.sweep_dir / "results.md")


if __name__ == "__main__":
    main()
