"""Build the tidy results table of a sweep from its stage records.

Long form (one row per cell x metric) is the source of truth; the wide table (one row per
cell) and the Markdown rendering are views of it. Missing or failed stages give empty cells
and a ``status`` column, never invented numbers.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.store import read_json, write_text

log = logging.getLogger(__name__)

KEY_COLS = ["dataset", "prior", "loss", "lambda", "tokenizer", "generator", "seed"]
# The metric columns the evaluation stages write (names fixed by the evaluation's contract):
# `_domain` metrics use the features of a classifier trained on the dataset itself (Inception
# features say little about 28 px grey images); `_lo`/`_hi` are per-cell bootstrap 95% intervals
# (resampling the generated set); `floor_*` are real-vs-real values (train vs test images at the
# same counts), one per dataset: roughly the best a generator can score at these sample sizes.
DOMAIN_METRICS = ["fd_domain", "kid_domain", "precision_domain", "recall_domain", "rfd_domain"]
INTERVAL_METRICS = ["fd_domain", "gfid", "rfd_domain", "rfid"]
FLOOR_METRICS = ["fd_domain", "kid_domain", "precision_domain", "recall_domain", "gfid"]
METRICS = ["rfid", "psnr", "ssim", "gfid", "kid", "is", "precision", "recall", "fd_mobilenet_v2",
           "rfd_mobilenet_v2", "n_samples",
           "n_ref", "latent_swd_to_prior", "dm_teacher", "detector", "ref_features_sha256",
           *DOMAIN_METRICS, *[f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi")],
           *[f"floor_{m}" for m in FLOOR_METRICS], "tokenizer_design"]
PRIMARY, FALLBACK = "fd_domain", "gfid"
# Short names for captions and axis labels.
LABELS = {"gfid": "gFID", "fd_domain": "FD_domain", "rfid": "rFID", "rfd_domain": "rFD_domain"}
UNTIMED = ("fid_ref", "domain_detector")  # shared by every cell of a dataset: not a cost of any one cell


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
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def as_float(v: Any) -> float:
    """A table value as a float, NaN when empty or not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def primary_metric(wide: pd.DataFrame) -> str:
    """The metric that ranks priors: FD in the dataset classifier's features where the sweep has
    it, else Inception's gFID (sweeps evaluated before the domain classifier existed)."""
    has = PRIMARY in wide and pd.to_numeric(wide[PRIMARY], errors="coerce").notna().any()
    return PRIMARY if has else FALLBACK


def recon_metric(wide: pd.DataFrame) -> str:
    """The reconstruction counterpart of the primary metric (same feature space)."""
    has = "rfd_domain" in wide and pd.to_numeric(wide["rfd_domain"], errors="coerce").notna().any()
    return "rfd_domain" if primary_metric(wide) == PRIMARY and has else "rfid"


def _cell_value(r: pd.Series, c: str) -> str:
    """One table cell; a metric with a per-cell bootstrap interval reads `value [lo, hi]`."""
    lo, hi = as_float(r.get(f"{c}_lo")), as_float(r.get(f"{c}_hi"))
    if c in INTERVAL_METRICS and not (math.isnan(lo) or math.isnan(hi) or math.isnan(as_float(r[c]))):
        return f"{as_float(r[c]):.4g} [{lo:.4g}, {hi:.4g}]"
    return _fmt(r[c])


def markdown(df: pd.DataFrame, cols: list[str]) -> str:
    # Optional metrics nobody computed (e.g. fd_mobilenet_v2 without the extra detector) would be
    # columns of dashes: leave them out; key columns always stay.
    cols = [c for c in cols if c in df.columns and (c in KEY_COLS or c == "status" or df[c].notna().any())]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell_value(r, c) for c in cols) + " |")
    return "\n".join(lines) + "\n"


SUMMARY = KEY_COLS + ["tokenizer_design", "status", "rfid", "rfd_domain", "psnr", "ssim", "gfid", "fd_domain",
                      "kid", "kid_domain", "precision", "recall", "precision_domain", "recall_domain",
                      "rfd_mobilenet_v2", "fd_mobilenet_v2",
                      "latent_swd_to_prior", "n_samples", "n_ref", "dm_teacher", "backbone_weights"]


SEED_METRICS = ["rfid", "rfd_domain", "psnr", "ssim", "gfid", "fd_domain", "kid", "kid_domain", "precision",
                "recall", "precision_domain", "recall_domain"]
CARRY = ["tokenizer_design"]  # descriptive cell columns shown beside the keys where present


def t_halfwidth(std: float, n: int) -> float:
    """Half-width of the two-sided 95% Student-t interval for a mean of n values:
    t_{0.975, n-1} * s / sqrt(n) (NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.5.2,
    'Confidence limits for the mean'); NaN below 2 values."""
    from scipy.stats import t
    if n < 2 or math.isnan(std):
        return math.nan
    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def over_seeds(wide: pd.DataFrame, keys: list[str] | None = None, metrics: list[str] | None = None,
               require: str | None = None, sort: bool = False) -> pd.DataFrame:
    """Mean, sample std, count (``_n``) and 95% t-interval half-width (``_ci95``) over seeds of the
    finished cells of each group of ``keys`` (default: every key but the seed), with ``n_seeds``
    (finished cells in the group; a metric missing in some of them has a smaller ``_n``).
    ``require``: only cells with that metric set. Missing values are NaN. The one implementation
    behind the tables and the figures."""
    keys = list(keys or [k for k in KEY_COLS if k != "seed"])
    metrics = list(metrics or SEED_METRICS)
    carry = [c for c in CARRY if c in wide and c not in keys and wide[c].notna().any()]
    done = wide[wide["status"] == "done"]
    if require is not None:
        done = done[pd.to_numeric(done[require], errors="coerce").notna()]
    rows = []
    for key, grp in done.groupby(keys, dropna=False, sort=sort):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for c in carry:  # constant within a group in practice; several values are all shown
            row[c] = ", ".join(sorted({str(v) for v in grp[c].dropna()})) or None
        row["n_seeds"] = len(grp)
        for m in metrics:
            vals = pd.to_numeric(grp[m], errors="coerce").dropna() if m in grp else pd.Series(dtype=float)
            row[m] = vals.mean() if len(vals) else math.nan
            row[f"{m}_std"] = vals.std(ddof=1) if len(vals) > 1 else math.nan
            row[f"{m}_n"] = len(vals)
            row[f"{m}_ci95"] = t_halfwidth(row[f"{m}_std"], len(vals))
        rows.append(row)
    cols = keys + carry + ["n_seeds"] + [c for m in metrics for c in (m, f"{m}_std", f"{m}_n", f"{m}_ci95")]
    return pd.DataFrame(rows, columns=cols)


def mean_pm(mean: Any, std: Any, ci95: Any = math.nan, n: Any = None, n_seeds: Any = None) -> str:
    """`mean ± std [±ci95]`, the value alone with one seed, `(n=k)` when the metric has fewer
    values than the group has seeds."""
    mean, std, ci95 = as_float(mean), as_float(std), as_float(ci95)
    if math.isnan(mean):
        return "–"
    text = f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"
    if not math.isnan(ci95):
        text += f" [±{ci95:.2g}]"
    if n is not None and n_seeds is not None and int(n) != int(n_seeds):
        text += f" (n={int(n)})"
    return text


SEEDS_NOTE = ("Each entry: mean ± sample standard deviation over seeds [± half-width of the 95% "
              "Student-t interval for the mean, t(0.975, n-1) · std / √n]; a single seed shows its value "
              "alone (no spread, no interval); `(n=k)` marks a metric measured on fewer seeds than "
              "n_seeds. With 2 seeds t(0.975, 1) = 12.7, so the interval is 9x the std: two seeds "
              "bound a mean only loosely. `results_over_seeds.csv` has the same numbers in columns "
              "`<metric>`, `<metric>_std`, `<metric>_n`, `<metric>_ci95`.")


def seeds_markdown(summary: pd.DataFrame) -> str:
    keys = [k for k in KEY_COLS if k != "seed"] + [c for c in CARRY if c in summary] + ["n_seeds"]
    # A metric no finished cell has (the domain metrics in older sweeps) is no column of dashes.
    metrics = [m for m in SEED_METRICS if m in summary and summary[m].notna().any()]
    lines = ["| " + " | ".join(keys + metrics) + " |", "|" + "---|" * (len(keys) + len(metrics))]
    for _, r in summary.iterrows():
        cells = [_fmt(r[k]) for k in keys] + [
            mean_pm(r[m], r[f"{m}_std"], r.get(f"{m}_ci95"), r.get(f"{m}_n"), r["n_seeds"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- real-vs-real floors

# Display order of the floors: the domain classifier's, then Inception's, then the FD at the EMA
# snapshots' sample count; `floor_n*` are the sample counts of the floors, not metrics.
FLOOR_ORDER = ["fd_domain", "kid_domain", "precision_domain", "recall_domain", "gfid", "kid", "precision", "recall",
               "fd_snap_domain"]
FLOOR_COUNT = re.compile(r"^n(_|$)")


def _floor_columns(wide: pd.DataFrame) -> list[str]:
    """floor_<metric> columns in display order; KID's subset std is no floor of its own."""
    order = {m: i for i, m in enumerate(FLOOR_ORDER)}
    cols = [c for c in wide.columns if c.startswith("floor_") and "kid_std" not in c]
    return sorted(cols, key=lambda c: (order.get(c[len("floor_"):], len(order)), c))


def floor_values(wide: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per dataset, {metric: floor} from the `floor_<metric>` columns (empty ones left out; the
    sample counts `floor_n*` come last, under their own names, e.g. `n_domain`).

    A floor is one number per dataset; should cells disagree (records of two evaluation
    versions), the mean is reported and a warning logged rather than a number picked silently.
    """
    cols = _floor_columns(wide)
    out: dict[str, dict[str, float]] = {}
    for dataset, grp in wide.groupby("dataset", sort=True):
        vals = {}
        for c in cols:
            v = pd.to_numeric(grp[c], errors="coerce").dropna()
            if len(v) == 0:
                continue
            if v.nunique() > 1:
                log.warning("%s: %s differs across cells (%s); reporting the mean", dataset, c, sorted(v.unique()))
            vals[c[len("floor_"):]] = float(v.mean())
        if vals:
            out[str(dataset)] = dict(sorted(vals.items(), key=lambda kv: bool(FLOOR_COUNT.match(kv[0]))))
    return out


def floor_sentence(vals: dict[str, float], dataset: str | None = None) -> str:
    """'real-vs-real floor (train vs test, same counts): fd_domain 3.1, gfid 36.' for one dataset,
    with the floors' sample counts after a semicolon where the sweep recorded them."""
    where = f", {dataset}" if dataset else ""
    metrics = {m: v for m, v in vals.items() if not FLOOR_COUNT.match(m)}
    counts = {m: v for m, v in vals.items() if FLOOR_COUNT.match(m)}
    if not metrics:
        return f"real-vs-real floor{where}: not recorded in this sweep (no `floor_*` columns)."
    text = (f"real-vs-real floor{where} (train vs test, same counts): "
            + ", ".join(f"{m} {v:.4g}" for m, v in metrics.items()))
    if counts:
        text += "; sample counts " + ", ".join(f"{m} {v:g}" for m, v in counts.items())
    return text + "."


def floors_line(wide: pd.DataFrame) -> str:
    """The line printed under every results table: what real images score against real images at
    the same counts, i.e. roughly the best value a generator can reach at these sample sizes."""
    floors = floor_values(wide)
    if not floors:
        return floor_sentence({}) + "\n"
    many = len(floors) > 1 or wide["dataset"].nunique() > 1
    return "\n\n".join(floor_sentence(v, d if many else None) for d, v in floors.items()) + "\n"


CELL_NOTE = ("`value [lo, hi]`: the cell's 95% bootstrap percentile interval, resampling its generated "
             "(or reconstructed) set; it measures the metric's sampling noise for one seed, not the "
             "seed-to-seed spread (see the table over seeds).")


def results_markdown(wide: pd.DataFrame, summary: pd.DataFrame) -> str:
    """results.md: the per-cell table and the table over seeds, each with the floors under it."""
    floors = floors_line(wide)
    has_intervals = any(f"{m}_lo" in wide and wide[f"{m}_lo"].notna().any() for m in INTERVAL_METRICS)
    md = "# Results\n\n## Per cell\n\n" + markdown(wide, SUMMARY) + "\n" + floors
    if has_intervals:
        md += "\n" + CELL_NOTE + "\n"
    md += "\n## Mean ± std over seeds (finished cells)\n\n" + seeds_markdown(summary) + "\n" + floors
    md += "\n" + SEEDS_NOTE + "\n"
    md += (f"\nThe primary generation metric is `{primary_metric(wide)}` (`fd_domain` where the sweep has it, "
           "else `gfid`). FID values use the sample counts in `n_samples`/`n_ref` and the detector in "
           "results.csv; compare them only at equal counts.\n")
    return md


def write_tables(sweep_dir: Path, run_root: Path) -> pd.DataFrame:
    cells = read_json(sweep_dir / "cells.json")
    wide = cell_rows(cells, run_root)
    buf = wide.to_csv(index=False)
    write_text(sweep_dir / "results.csv", buf)
    write_text(sweep_dir / "results_long.csv", to_long(wide).to_csv(index=False))
    summary = over_seeds(wide)
    write_text(sweep_dir / "results_over_seeds.csv", summary.to_csv(index=False))
    write_text(sweep_dir / "results.md", results_markdown(wide, summary))
    cols = [c for c in SUMMARY if c in wide.columns and (c in KEY_COLS or c == "status" or wide[c].notna().any())]
    write_text(sweep_dir / "results.tex", wide[cols].to_latex(index=False, na_rep="--", float_format="%.4g"))
    return wide


# ---------------------------------------------------------------- the trade-off figure
# One function draws it for the sweep directory (after every run) and for the exported results
# (benchmark.figures): rFID and PSNR against gFID (rFD_domain against FD_domain where the sweep has
# them), one marker per (prior, loss, lambda, presets) group, mean over seeds with ± std bars.

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
    n = pd.to_numeric(wide["n_samples"], errors="coerce").dropna() if "n_samples" in wide else pd.Series(dtype=float)
    return f"FID on {int(n.iloc[0])} samples" if len(n) and n.nunique() == 1 else "FID sample counts vary"


def tradeoff_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    """(figure, caption) on the primary metric (FD_domain, else gFID) and its reconstruction
    counterpart; raises NothingToPlot when no finished cell has the primary metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="paper")
    gen, rec = primary_metric(wide), recon_metric(wide)
    summ = over_seeds(wide, SETTING + ["prior", "loss", "lambda"], [gen, rec, "psnr"], require=gen, sort=True)
    if summ.empty:
        raise NothingToPlot(f"no finished cell has {LABELS[gen]}")
    pal = palette(list(summ["prior"]))
    multi_lambda = summ.groupby(["prior", "loss"])["lambda"].nunique().max() > 1
    varying = [k for k in SETTING if summ[k].nunique() > 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, y, ylab in ((axes[0], rec, f"{LABELS[rec]} (lower: better reconstruction)"),
                        (axes[1], "psnr", "PSNR (dB, higher: better)")):
        ok = summ.dropna(subset=[y])
        for _, r in ok.iterrows():
            ax.errorbar(r[gen], r[y], xerr=None if math.isnan(r[f"{gen}_std"]) else r[f"{gen}_std"],
                        yerr=None if math.isnan(r[f"{y}_std"]) else r[f"{y}_std"],
                        fmt="none", ecolor=pal[r["prior"]], alpha=0.7, capsize=3, zorder=1)
            # Label only what the legend cannot say (and only in the first panel: labels overlap).
            text = point_name(r, (["prior", "loss"] if len(ok) <= LABEL_POINTS else [])
                              + (["lambda"] if multi_lambda else []) + varying)
            if text and ax is axes[0]:
                ax.annotate(text, (r[gen], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if len(ok):  # no cell with this panel's metric (no reconstruction evaluated): an empty panel
            sns.scatterplot(data=ok, x=gen, y=y, hue="prior", style="loss", palette=pal, s=80, ax=ax, zorder=2,
                            hue_order=sorted(pal), style_order=sorted(summ["loss"].unique()), legend=ax is axes[-1])
        ax.set_xlabel(f"{LABELS[gen]} (lower: easier to generate)")
        ax.set_ylabel(ylab)
    if axes[-1].get_legend() is not None:  # absent when no cell has a PSNR
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
    floors = {d: v[gen] for d, v in floor_values(wide).items() if gen in v}
    for dataset, floor in floors.items():  # what real test images score: the practical best at these counts
        for ax in axes:
            ax.axvline(floor, color="grey", ls=":", lw=1)
        axes[0].annotate(f"real-vs-real floor{' ' + dataset if len(floors) > 1 else ''}", (floor, 1),
                         xycoords=("data", "axes fraction"), fontsize=7, rotation=90, ha="right", va="top")
    fig.suptitle(f"{title}: reconstruction vs generation ({counts_note(wide)}; bars: ± std over seeds)")
    left_out = wide[~((wide["status"] == "done") & pd.to_numeric(wide[gen], errors="coerce").notna())]
    caption = ("Each marker is one (prior, loss, lambda, presets) group, mean over seeds; bars are ± one "
               "standard deviation (absent with one seed). Lower-left is better in the reconstruction panel, "
               "upper-left in the PSNR panel." + (" Dotted line: the real-vs-real floor (train vs test images "
                                                     "at the same counts)." if floors else ""))
    if len(left_out):
        names = left_out["label"] if "label" in left_out else left_out["prior"] + "/" + left_out["loss"]
        caption += f" Left out (no {LABELS[gen]}): {', '.join(map(str, names))}."
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
