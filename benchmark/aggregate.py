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
UNTIMED = ("fid_ref",)  # shared by every cell of a dataset: not a cost of any one cell


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
                    # Records written before lambda had one name called it loss_weight.
                    row.setdefault("lambda" if k == "loss_weight" else k, v)
                if stage not in UNTIMED:
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


def over_seeds(wide: pd.DataFrame, keys: list[str] | None = None, metrics: list[str] | None = None,
               require: str | None = None, sort: bool = False) -> pd.DataFrame:
    """Mean and sample std over seeds of the finished cells of each group of ``keys`` (default:
    every key but the seed), with ``n_seeds``. ``require``: only cells with that metric set.
    Missing values are NaN. The one implementation behind the tables and the figures."""
    keys = list(keys or [k for k in KEY_COLS if k != "seed"])
    metrics = list(metrics or SEED_METRICS)
    done = wide[wide["status"] == "done"]
    if require is not None:
        done = done[pd.to_numeric(done[require], errors="coerce").notna()]
    rows = []
    for key, grp in done.groupby(keys, dropna=False, sort=sort):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_seeds"] = len(grp)
        for m in metrics:
            vals = pd.to_numeric(grp[m], errors="coerce").dropna() if m in grp else pd.Series(dtype=float)
            row[m] = vals.mean() if len(vals) else math.nan
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=keys + ["n_seeds"] + [c for m in metrics for c in (m, f"{m}_std")])


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


# ---------------------------------------------------------------- the trade-off figure
# One function draws it for the sweep directory (after every run) and for the exported results
# (benchmark.figures): rFID and PSNR against gFID, one marker per (prior, loss, lambda, presets)
# group, mean over seeds with ± std bars.

SETTING = ["dataset", "tokenizer", "generator"]
LABEL_POINTS = 6  # more prior/loss labels than this overlap; the legend identifies every marker


class NothingToPlot(Exception):
    """A figure the sweep cannot support (yet); the message says why."""


def palette(names: list[str]) -> dict[str, Any]:
    import seaborn as sns
    names = sorted(set(names))
    return dict(zip(names, sns.color_palette("colorblind", max(len(names), 1))))


def point_name(r: pd.Series, keys: list[str]) -> str:
    """prior/loss, then whatever else tells groups apart: 'gaussian/dm λ=10 gen cpu-small'."""
    fmt = {"lambda": lambda v: f"λ={float(v):g}", "generator": "gen {}".format, "tokenizer": "tok {}".format}
    head = "/".join(str(r[k]) for k in keys if k in ("prior", "loss"))
    return " ".join([head] * bool(head) + [fmt.get(k, str)(r[k]) for k in keys if k not in ("prior", "loss")])


def counts_note(wide: pd.DataFrame) -> str:
    n = pd.to_numeric(wide.get("n_samples"), errors="coerce").dropna()
    return f"FID on {int(n.iloc[0])} samples" if len(n) and n.nunique() == 1 else "FID sample counts vary"


def tradeoff_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    """(figure, caption); raises NothingToPlot when no finished cell has a gFID."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="paper")
    summ = over_seeds(wide, SETTING + ["prior", "loss", "lambda"], ["gfid", "rfid", "psnr"], require="gfid", sort=True)
    if summ.empty:
        raise NothingToPlot("no finished cell has gFID")
    pal = palette(list(summ["prior"]))
    multi_lambda = summ.groupby(["prior", "loss"])["lambda"].nunique().max() > 1
    varying = [k for k in SETTING if summ[k].nunique() > 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, y, ylab in ((axes[0], "rfid", "rFID (lower: better reconstruction)"), (axes[1], "psnr", "PSNR (dB, higher: better)")):
        ok = summ.dropna(subset=[y])
        for _, r in ok.iterrows():
            ax.errorbar(r["gfid"], r[y], xerr=None if math.isnan(r["gfid_std"]) else r["gfid_std"],
                        yerr=None if math.isnan(r[f"{y}_std"]) else r[f"{y}_std"],
                        fmt="none", ecolor=pal[r["prior"]], alpha=0.7, capsize=3, zorder=1)
            # Label only what the legend cannot say (and only in the first panel: labels overlap).
            text = point_name(r, (["prior", "loss"] if len(ok) <= LABEL_POINTS else [])
                              + (["lambda"] if multi_lambda else []) + varying)
            if text and ax is axes[0]:
                ax.annotate(text, (r["gfid"], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        sns.scatterplot(data=ok, x="gfid", y=y, hue="prior", style="loss", palette=pal, s=80, ax=ax, zorder=2,
                        hue_order=sorted(pal), style_order=sorted(summ["loss"].unique()), legend=ax is axes[-1])
        ax.set_xlabel("gFID (lower: easier to generate)")
        ax.set_ylabel(ylab)
    if axes[-1].get_legend() is not None:  # absent when no cell has a PSNR
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"{title}: reconstruction vs generation ({counts_note(wide)}; bars: ± std over seeds)")
    left_out = wide[~((wide["status"] == "done") & pd.to_numeric(wide["gfid"], errors="coerce").notna())]
    caption = ("Each marker is one (prior, loss, lambda, presets) group, mean over seeds; bars are ± one "
               "standard deviation (absent with one seed). Lower-left is better in the rFID panel, "
               "upper-left in the PSNR panel.")
    if len(left_out):
        names = left_out["label"] if "label" in left_out else left_out["prior"] + "/" + left_out["loss"]
        caption += f" Left out (no gFID): {', '.join(map(str, names))}."
    return fig, caption


def tradeoff_plot(wide: pd.DataFrame, path: Path, title: str = "sweep") -> None:
    """The trade-off figure of a sweep directory, written after every run (a placeholder that
    says so while no cell has finished)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmark.store import save_figure
    try:
        fig, _ = tradeoff_figure(wide, title)
    except NothingToPlot as e:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.text(0.5, 0.5, f"nothing to plot yet: {e}", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
    save_figure(path, fig, dpi=150, bbox_inches="tight")
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
