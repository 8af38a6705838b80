"""``python -m benchmark.figures``: paper-style figures of every exported sweep, from results/ alone.

Reads only what ``benchmark.export`` puts into ``results/<sweep>/`` (results.csv, cells.json,
cell_configs.yaml, cells/<cell_id>/*.png); nothing is trained and no run directory is needed.
For each sweep it writes into ``<out>/<sweep>/figures/`` (``<out>`` defaults to the results
folder itself), every figure as PNG and PDF:

    tradeoff.{png,pdf}         rFID and PSNR against gFID, mean ± std over seeds
    gfid_vs_lambda.{png,pdf}   gFID against the matching-loss weight (only if some line has 2+ lambdas)
    gfid_vs_epochs.{png,pdf}   gFID against the generator's epochs (only if cells differ in epochs)
    ranking.{png,pdf}          each prior's mean with its 95% interval over seeds, best first
    convergence.{png,pdf}, convergence.md   gFID against generator training (EMA snapshots at
                               25/50/75/100%) and whether the ranking is the same at each snapshot
                               (only if results.csv has snapshot columns)
    latent_curves.{png,pdf}, latent_curves.md   latent std and SWD to p_ref against tokenizer iteration,
                               and whether SWD settled in the match phase (only if a tokenizer run
                               wrote latent_curve.json, i.e. tokenizer.stats_every > 0)
    teacher_curves.{png,pdf}, teacher_curves.md   held-out flow-matching loss of each dm teacher
                               against its step (only if a teacher run wrote teacher_curve.json)
                               Both curve files are read from cells/<cell_id>/ where an export holds
                               them, else from the run directories (runs/stages/...) when the folder
                               is a sweep under runs/sweeps/ (see stage_file)
    samples_<prior>.{png,pdf}  samples and reconstructions, one row per cell of that prior
    ranking.csv, ranking.md, ranking_spearman.csv   our ranking of the priors beside the paper's Table 1,
                               with Welch's test between neighbours and a seed-bootstrap interval for rho
    manifest.json              what was drawn (title, caption) and what was skipped, and why

"gFID" above is the sweep's primary generation metric: FD in the features of a classifier trained
on the dataset (``fd_domain``) where the sweep has it, else Inception's gFID (``gfid``).

and the paper's own figures from its tables into ``<out>/paper/figures/``. Then it writes the
HTML report of each sweep (``benchmark.report``). Figures that a sweep cannot support are not
drawn: the reason is logged and kept in manifest.json, never replaced by an empty plot.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from benchmark.aggregate import (DOMAIN_METRICS, INTERVAL_METRICS, KEY_COLS, LABELS, SETTING, NothingToPlot as Skip,
                                 as_float, floor_sentence, floor_values, mean_pm, over_seeds, palette,
                                 point_name as _name, primary_metric, tradeoff_figure)
from benchmark.export import PAPER_DIR, find_sweeps
from benchmark.settings import generator_epochs
from benchmark.store import read_json, save_figure, write_json, write_text

log = logging.getLogger("benchmark.figures")

PAPER_TABLE1 = "dmvae_paper_table1_priors.csv"
PAPER_TABLE2 = "dmvae_paper_table2_ablations.csv"
PAPER_TABLE3 = "dmvae_paper_table3_system.csv"

# Our prior labels (the tables' `prior` column) -> the rows ("reference" column) of the paper's Table 1
# (Ye et al., arXiv 2512.07778 v2, ImageNet 256, gFID-5K). The paper's prior rows were all
# trained with its DM loss, so only our `dm` cells map to them; any cell trained with the `kl`
# loss is the paper's "VAE baseline" whatever its prior says (the KL pulls towards N(0, I)).
# Approximations, stated so nobody mistakes them for the same model:
#   dinov2 / offline-mae -> DINO        (paper: DINOv2-L features; offline-mae is a small
#                                        MAE trained here, the only SSL backbone available offline)
#   resnet50-sup / mobilenet_v2-sup -> ResNet (a supervised ImageNet CNN; MobileNetV2 is our CPU stand-in)
#   text-clip            -> SigLIP-text  (text embeddings of captions / class names)
#   sub-offline-mae / sub-dinov2 -> SubDINO (SSL features of a class subset)
#   difftraj             -> Difftraj     (noisy diffusion latents)
# Priors not listed (and losses other than dm/kl) have no paper counterpart: they are ranked
# but left out of the rank correlation.
PAPER_ROW_OF_PRIOR = {
    "gaussian": "Gaussian", "gmm": "GMM", "difftraj": "Difftraj",
    "dinov2": "DINO", "offline-mae": "DINO",
    "resnet50-sup": "ResNet", "mobilenet_v2-sup": "ResNet",
    "text-clip": "SigLIP-text", "text": "SigLIP-text",
    "sub-offline-mae": "SubDINO", "sub-dinov2": "SubDINO",
}
PAPER_LOSS, BASELINE_LOSS, BASELINE_ROW = "dm", "kl", "VAE baseline"
MIN_SHARED = 3  # Spearman's rho over fewer than 3 pairs is +-1 or undefined: not a finding

METRICS = ["gfid", "rfid", "psnr"]  # always numeric columns of a loaded sweep (empty when absent)
RANKING_COLS = SETTING + ["prior", "loss", "lambda", "tokenizer_design", "n_seeds", "metric", "mean", "std", "ci95",
                          "rank", "p_vs_next", "vs_next", "gfid", "gfid_std", "rfid", "psnr",
                          "paper_reference", "paper_gfid_5k", "paper_rank", "in_correlation",
                          "rank_shared", "paper_rank_shared", "note"]
SPEARMAN_COLS = SETTING + ["metric", "n_shared", "spearman_rho", "p_value", "rho_lo", "rho_hi", "n_boot",
                           "shared", "note"]
ALPHA = 0.05         # two neighbours are "distinct" when Welch's test gives p below this
N_BOOT = 2000        # bootstrap resamples of the seeds for the interval of Spearman's rho
BOOT_SEED = 0        # fixed: the interval is reproducible from results.csv alone
SNAP = re.compile(r"^snap(\d{3})_(.+)$")  # snapNNN_<metric>: the EMA model at NNN% of generator training
IMAGES = (("samples.png", "generated samples (one row per class)"),
          ("reconstructions.png", "reconstructions (top: held-out images, bottom: decoded)"))


def paper_reference(prior: str, loss: str) -> str | None:
    """The paper's Table 1 row that a (prior, loss) cell stands for, or None."""
    if loss == BASELINE_LOSS:
        return BASELINE_ROW
    if loss == PAPER_LOSS:
        return PAPER_ROW_OF_PRIOR.get(prior)
    return None


# ---------------------------------------------------------------- loading

def _epochs(cfg: dict[str, Any]) -> float | None:
    g = cfg.get("generator", {})
    try:  # from the sizes, as the config derives it: a stored config may predate that derivation
        return generator_epochs(g)
    except (KeyError, TypeError, ZeroDivisionError):
        return float(g["epochs"]) if g.get("epochs") is not None else None


def load_cells(sweep_dir: Path) -> pd.DataFrame:
    """One row per cell of cells.json in results.csv's order, with cell_id, label and epochs."""
    cells = read_json(sweep_dir / "cells.json")
    cfgs: list[dict] = []
    if (sweep_dir / "cell_configs.yaml").exists():
        cfgs = [c for c in yaml.safe_load_all((sweep_dir / "cell_configs.yaml").read_text()) if c]
    if cfgs and len(cfgs) != len(cells):
        log.warning("%s: cell_configs.yaml has %d configs for %d cells; epochs left empty",
                    sweep_dir.name, len(cfgs), len(cells))
        cfgs = []
    rows = []
    for i, cell in enumerate(cells):
        row = dict(cell["keys"])
        row["cell_id"] = cell.get("cell_id")
        row["label"] = cell.get("label", row["cell_id"])
        row["epochs"] = _epochs(cfgs[i]) if cfgs else None
        rows.append(row)
    return pd.DataFrame(rows)


def load_sweep(sweep_dir: Path) -> pd.DataFrame:
    """results.csv joined with cells.json (same order: aggregate.cell_rows walks cells.json)."""
    wide = pd.read_csv(sweep_dir / "results.csv")
    cells = load_cells(sweep_dir)
    same = len(cells) == len(wide) and all(
        (cells[k].astype(str).values == wide[k].astype(str).values).all() for k in ("prior", "loss", "seed"))
    if same:
        for c in ("cell_id", "label", "epochs"):
            wide[c] = cells[c].values
    else:  # fall back to the keys; cells that share all keys cannot be told apart then
        log.warning("%s: results.csv and cells.json differ in order or length; joining on %s", sweep_dir.name, KEY_COLS)
        wide = wide.merge(cells.drop_duplicates(KEY_COLS), on=KEY_COLS, how="left")
    for m in METRICS:
        wide[m] = pd.to_numeric(wide.get(m), errors="coerce")
    # The other metric columns where the sweep has them, as numbers even where read_csv guessed text.
    bounds = {f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi")}
    for c in [c for c in wide.columns if c in DOMAIN_METRICS or c in bounds or c.startswith("floor_") or SNAP.match(c)]:
        wide[c] = pd.to_numeric(wide[c], errors="coerce")
    if "status" not in wide:
        wide["status"] = "done"
    return wide


def read_paper_table(results: Path, name: str) -> pd.DataFrame | None:
    """A paper table: '#' header comments, then CSV whose first column is text.

    A row with more fields than the header has commas in its unquoted first column (Table 2's
    "t range annealed [0,1]->[0,0.5]"); the surplus leading fields are joined back into it.
    """
    import csv
    import io
    path = results / PAPER_DIR / name
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    rows = list(csv.reader(lines))
    head, n = rows[0], len(rows[0])
    fixed = [[",".join(r[:len(r) - n + 1])] + r[len(r) - n + 1:] if len(r) > n else r for r in rows[1:]]
    buf = io.StringIO()
    csv.writer(buf).writerows([head] + fixed)
    return pd.read_csv(io.StringIO(buf.getvalue()))


# ---------------------------------------------------------------- ranking (table 5)

def seed_values(wide: pd.DataFrame, keys: list[str], metric: str) -> dict[tuple, np.ndarray]:
    """The per-seed values of ``metric`` of the finished cells of each group of ``keys``: what
    over_seeds averages, kept apart for the tests and the bootstrap. Keyed by the group's values
    as strings (see _key), so a float or NaN key finds its group again."""
    done = wide[wide["status"] == "done"]
    out = {}
    for key, grp in done.groupby(keys, dropna=False, sort=False):
        vals = pd.to_numeric(grp[metric], errors="coerce").dropna().to_numpy(dtype=float)
        if len(vals):
            out[_key(key if isinstance(key, tuple) else (key,))] = vals
    return out


def _key(values: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def welch(a: np.ndarray, b: np.ndarray, alpha: float = ALPHA) -> tuple[float, str]:
    """(p, verdict): can two priors' seed values be told apart? Welch's two-sided t-test (unequal
    variances; Welch 1947, Biometrika 34:28) via scipy.stats.ttest_ind(equal_var=False). It needs
    a variance on both sides: with one seed, or no spread at all, the answer is 'cannot tell'."""
    from scipy.stats import ttest_ind
    n = min(len(a), len(b))
    if n < 2:
        return math.nan, f"cannot tell ({n} seed)"
    if np.var(a) == 0 and np.var(b) == 0:  # scipy answers p = 0 here: a zero standard error, no test
        return math.nan, "cannot tell (no spread over seeds)"
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p, f"{'distinct' if p < alpha else 'cannot tell'} (p = {p:.2g})"


def spearman_rows(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row of x (B x k) with ref (k): Pearson's r of the average ranks,
    which is what scipy.stats.spearmanr computes (ties share the mean rank); NaN for a row whose
    ranks are all tied."""
    from scipy.stats import rankdata
    rx = rankdata(x, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    rr = rankdata(ref) - (len(ref) + 1) / 2
    den = np.sqrt((rx ** 2).sum(axis=1) * (rr ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, rx @ rr / den, math.nan)


def bootstrap_spearman(values: list[np.ndarray], ref: np.ndarray, n_boot: int = N_BOOT,
                       seed: int = BOOT_SEED) -> tuple[float, float, int]:
    """Percentile 95% interval of Spearman's rho between the per-prior means and ``ref`` when each
    prior's seeds are resampled with replacement (Efron & Tibshirani 1993, ch. 13): the paper's
    values are fixed, only our seed noise varies. Returns (lo, hi, resamples with a defined rho)."""
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, len(values)))
    for j, v in enumerate(values):
        means[:, j] = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    rho = spearman_rows(means, np.asarray(ref, dtype=float))
    ok = rho[np.isfinite(rho)]
    if not len(ok):
        return math.nan, math.nan, 0
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return float(lo), float(hi), len(ok)


def _best_lambda(grp: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (prior, loss): the lambda with the lowest mean; the paper reports each reference
    at its own tuned lambda (10 data-derived, 1 synthetic). Rows come out sorted, best first."""
    return grp.sort_values(metric, kind="mergesort").drop_duplicates(["prior", "loss"])


def _neighbours(vals: list[np.ndarray]) -> tuple[list[float], list[str | None]]:
    """Welch's test of each ranked prior against the next one down (the last has none)."""
    tests = [welch(a, b) for a, b in zip(vals, vals[1:])] + [(math.nan, None)]
    return [p for p, _ in tests], [v for _, v in tests]


def _spearman_row(setting: tuple, metric: str, shared: pd.DataFrame, vals: list[np.ndarray],
                  paper: pd.DataFrame | None, n_boot: int, boot_seed: int) -> dict[str, Any]:
    from scipy.stats import spearmanr
    row = dict(zip(SETTING, setting), metric=metric, n_shared=len(shared), spearman_rho=math.nan, p_value=math.nan,
               rho_lo=math.nan, rho_hi=math.nan, n_boot=0,
               shared=", ".join(f"{p}/{l}={r}" for p, l, r in zip(shared["prior"], shared["loss"], shared["paper_reference"])))
    if paper is None:
        return row | {"note": f"undefined: the paper's table ({PAPER_DIR}/{PAPER_TABLE1}) is missing"}
    if len(shared) < MIN_SHARED:
        return row | {"note": f"undefined: {len(shared)} prior(s) shared with the paper's Table 1, "
                              f"Spearman's rho needs at least {MIN_SHARED}"}
    rho, p = spearmanr(shared["mean"], shared["paper_gfid_5k"])
    if math.isnan(rho):
        return row | {"note": "undefined: one of the two rankings is constant (ties)"}
    lo, hi, n_ok = bootstrap_spearman(vals, shared["paper_gfid_5k"].to_numpy(float), n_boot, boot_seed)
    note = (f"computed over {len(shared)} shared priors; 95% interval: {n_boot} bootstrap resamples of the "
            f"seeds within each prior (numpy seed {boot_seed}), percentiles 2.5-97.5")
    if n_ok < n_boot:
        note += f" ({n_boot - n_ok} resamples with all-tied ranks left out)"
    if max(len(v) for v in vals) < 2:
        note += "; every shared prior has one seed, so the interval shows no seed noise"
    return row | dict(spearman_rho=float(rho), p_value=float(p), rho_lo=lo, rho_hi=hi, n_boot=n_ok, note=note)


def ranking(wide: pd.DataFrame, paper: pd.DataFrame | None, n_boot: int = N_BOOT,
            boot_seed: int = BOOT_SEED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our priors ranked by the primary metric's mean over seeds (lower is better) beside the
    paper's Table 1, per setting.

    One row per (setting, prior, loss), at its best lambda (lowest mean over seeds), with the mean,
    std and 95% t-interval half-width over seeds, and Welch's test against the next prior down.
    Returns (ranking, spearman), spearman with one row per setting: rho of our means against the
    paper's gFID-5K over the shared priors, its p-value, and a seed-bootstrap interval.
    """
    metric = primary_metric(wide)
    group = SETTING + ["prior", "loss", "lambda"]
    summ = over_seeds(wide, group, list(dict.fromkeys([metric, "gfid", "rfid", "psnr"])), require=metric, sort=True)
    seeds = seed_values(wide, group, metric)
    paper_gfid, paper_rank = {}, {}
    if paper is not None:
        paper_gfid = dict(zip(paper["reference"], paper["gfid_5k"]))
        paper_rank = dict(zip(paper["reference"], paper["gfid_5k"].rank(method="min").astype(int)))
    rows, corr = [], []
    for setting, grp in summ.groupby(SETTING, sort=True):
        best = _best_lambda(grp, metric)
        best = best.assign(metric=metric, mean=best[metric], std=best[f"{metric}_std"], ci95=best[f"{metric}_ci95"],
                           rank=best[metric].rank(method="min").astype(int))
        vals = [seeds[_key(r[k] for k in group)] for _, r in best.iterrows()]
        best["p_vs_next"], best["vs_next"] = _neighbours(vals)
        best["paper_reference"] = [paper_reference(p, l) for p, l in zip(best["prior"], best["loss"])]
        best["paper_gfid_5k"] = best["paper_reference"].map(paper_gfid)
        best["paper_rank"] = best["paper_reference"].map(paper_rank).astype("Int64")
        # Two of our priors may stand for one paper row (dinov2 and ssl): the better one counts.
        best["in_correlation"] = best["paper_gfid_5k"].notna() & ~best.duplicated("paper_reference")
        # Ranks among the shared priors only: the two columns a reader compares side by side.
        shared = best[best["in_correlation"]]
        best["rank_shared"] = shared["mean"].rank(method="min").astype("Int64")
        best["paper_rank_shared"] = shared["paper_gfid_5k"].rank(method="min").astype("Int64")
        rows.append(best)
        shared_vals = [v for v, keep in zip(vals, best["in_correlation"]) if keep]
        corr.append(_spearman_row(setting, metric, shared, shared_vals, paper, n_boot, boot_seed))
    # Priors whose every cell failed: listed without a rank, so the table says why they are missing.
    failed = wide[~wide.set_index(SETTING + ["prior", "loss"]).index.isin(
        summ.set_index(SETTING + ["prior", "loss"]).index)]
    if len(failed):
        f = failed.drop_duplicates(SETTING + ["prior", "loss"])[SETTING + ["prior", "loss", "lambda"]].copy()
        f["n_seeds"] = 0
        f["metric"] = metric
        f["paper_reference"] = [paper_reference(p, l) for p, l in zip(f["prior"], f["loss"])]
        f["in_correlation"] = False
        f["note"] = [_why_unranked(wide, r) for _, r in f.iterrows()]
        rows.append(f)
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    table = table.reindex(columns=RANKING_COLS)
    for c in ("rank", "paper_rank", "rank_shared", "paper_rank_shared"):
        table[c] = table[c].astype("Int64")
    return table, pd.DataFrame(corr, columns=SPEARMAN_COLS)


def _why_unranked(wide: pd.DataFrame, row: pd.Series) -> str:
    cells = wide[(wide[SETTING + ["prior", "loss"]].astype(str) == row[SETTING + ["prior", "loss"]].astype(str).values).all(axis=1)]
    reasons = sorted({str(f) for f in cells.get("failure", pd.Series(dtype=object)).dropna()})
    return "no finished cell" + (f" (failed: {'; '.join(reasons)})" if reasons else
                                 f" (status: {', '.join(sorted(set(cells['status'].astype(str))))})")


RANKING_NOTE = (
    "Ours: best lambda per (prior, loss), ranked by the mean over seeds of finished cells of `{metric}` "
    "(the primary metric: `fd_domain` where the sweep has it, else `gfid`), shown as mean ± std [± half-width "
    "of the 95% Student-t interval]. `vs_next`: Welch's t-test (two-sided, unequal variances, "
    "scipy.stats.ttest_ind with equal_var=False) of this prior's seed values against those of the next "
    "prior down; `distinct` when p < {alpha:g}, no correction for the several comparisons; it needs two "
    "seeds on both sides. Paper: gFID-5K on ImageNet 256 (arXiv 2512.07778 v2, Table 1). Only ranks are "
    "comparable, not the numbers. Spearman's p-value is scipy.stats.spearmanr's (t approximation); its "
    "interval resamples the seeds of each prior with replacement and recomputes the means and rho (the "
    "paper's values and the lambda choice stay fixed); with two seeds a prior's resampled mean takes only "
    "three values, so that interval is coarse and narrower than the real uncertainty (it cannot see seeds "
    "we did not run).\n")


def _ranking_display(sub: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, list[str]]:
    """The ranking rows as the Markdown shows them: the metric as `mean ± std [±ci95]`."""
    disp = sub.astype(object).where(sub.notna(), None)  # pd.NA -> "–" like every other empty cell
    disp[metric] = [mean_pm(m, s, c) if n else None
                    for m, s, c, n in zip(sub["mean"], sub["std"], sub["ci95"], sub["n_seeds"])]
    cols = ["prior", "loss", "lambda", "tokenizer_design", "n_seeds", metric, "rank", "vs_next"]
    if metric != "gfid":
        disp["gfid"] = [mean_pm(m, s) for m, s in zip(sub["gfid"], sub["gfid_std"])]
        cols.append("gfid")
    cols += ["rfid", "psnr", "paper_reference", "paper_gfid_5k", "paper_rank", "in_correlation", "rank_shared",
             "paper_rank_shared", "note"]
    return disp, cols


def _rho_sentence(c: pd.DataFrame) -> str:
    if c.empty:
        return "Spearman's rho: undefined: no finished cell in this setting"
    r = c.iloc[0]
    if math.isnan(r["spearman_rho"]):
        return f"Spearman's rho: {r['note']}"
    text = f"Spearman's rho = {r['spearman_rho']:.3f} (p = {r['p_value']:.3g}, n = {r['n_shared']}"
    if not math.isnan(r["rho_lo"]):
        text += (f"; 95% bootstrap interval over seeds [{r['rho_lo']:.3f}, {r['rho_hi']:.3f}], "
                 f"B = {r['n_boot']}")
    return text + ")"


def ranking_markdown(table: pd.DataFrame, corr: pd.DataFrame,
                     floors: dict[str, dict[str, float]] | None = None) -> str:
    """ranking.md; ``floors`` (aggregate.floor_values) adds the real-vs-real floor under each table."""
    from benchmark.aggregate import markdown
    metric = str(table["metric"].dropna().iloc[0]) if "metric" in table and table["metric"].notna().any() else "gfid"
    md = [f"# Ranking of the priors by {LABELS.get(metric, metric)} (lower is better) beside the paper's Table 1\n",
          RANKING_NOTE.format(metric=metric, alpha=ALPHA)]
    settings = table[SETTING].astype(str).drop_duplicates().sort_values(SETTING)
    for setting in settings.itertuples(index=False):
        sub = table[(table[SETTING].astype(str) == list(setting)).all(axis=1)]
        md.append(f"## {' / '.join(setting)}\n")
        disp, cols = _ranking_display(sub, metric)
        md.append(markdown(disp, cols))
        if floors is not None:
            vals = floors.get(setting[0], {})
            md.append("\n" + floor_sentence({m: v for m, v in vals.items() if m in (metric, "gfid")}))
        c = corr[(corr[SETTING].astype(str) == list(setting)).all(axis=1)]
        md.append(f"\n{_rho_sentence(c)}.\n")
    if table.empty:
        md.append("No cells: nothing to rank.\n")
    return "\n".join(md)


# ---------------------------------------------------------------- figures

def _theme() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="paper")


def _save(fig: Any, out: Path, stem: str) -> list[str]:
    import matplotlib.pyplot as plt
    # The tight box (legends outside the axes) once for both files: "tight" would draw twice per file.
    fig.draw_without_rendering()  # runs constrained layout, so the box is that of the final figure
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.1)
    save_figure(out / f"{stem}.png", fig, dpi=150, bbox_inches=bbox)
    # No CreationDate: regenerating unchanged results gives byte-identical PDFs (clean git diffs).
    save_figure(out / f"{stem}.pdf", fig, bbox_inches=bbox, metadata={"CreationDate": None})
    plt.close(fig)
    return [f"{stem}.png", f"{stem}.pdf"]


def _series_lines(wide: pd.DataFrame, x: str, group: list[str], title: str, xlabel: str, logx: bool,
                  metric: str = "gfid") -> Any:
    import matplotlib.pyplot as plt
    import seaborn as sns
    done = wide[(wide["status"] == "done") & wide[metric].notna()].copy()
    done["series"] = [_name(r, group) for _, r in done.iterrows()]
    done[x] = done[x].astype(float)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=done.sort_values(x), x=x, y=metric, hue="series", style="loss", markers=True, dashes=False,
                 estimator="mean", errorbar="sd", err_style="bars", err_kws={"capsize": 3}, ax=ax)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{LABELS.get(metric, metric)} (lower is better)")
    ax.set_title(title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    return fig


def lambda_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    metric = primary_metric(wide)
    done = wide[(wide["status"] == "done") & wide[metric].notna()]
    n = done.groupby(SETTING + ["prior", "loss"])["lambda"].nunique()
    if done.empty or n.max() < 2:
        lams = sorted(wide["lambda"].dropna().unique())
        raise Skip(f"no (prior, loss) has finished cells at two or more lambdas (lambdas in the sweep: "
                   f"{', '.join(f'{v:g}' for v in lams) or 'none'})")
    # Lines only: a (prior, loss) at a single lambda (the kl baseline, say) is no curve.
    lines = n[n >= 2].index
    keep = done.set_index(SETTING + ["prior", "loss"]).index.isin(lines)
    lam = done.loc[keep, "lambda"].astype(float)
    logx = bool((lam > 0).all() and lam.max() / lam.min() >= 10)
    group = ["prior", "loss"] + [k for k in SETTING if done[k].nunique() > 1]
    label = LABELS.get(metric, metric)
    fig = _series_lines(done[keep], "lambda", group, f"{title}: {label} against the matching-loss weight",
                        "λ (loss.lambda)" + (", log scale" if logx else ""), logx, metric)
    single = done.loc[~keep].drop_duplicates(group)
    caption = (f"One line per (prior, loss), mean {label} over seeds at each lambda, bars ± one std. "
               "The paper's Table 2 varies lambda for its DINO prior (see the paper figures).")
    if len(single):
        caption += " Not shown (one lambda only): " + ", ".join(_name(r, group) for _, r in single.iterrows()) + "."
    return fig, caption


def epochs_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    if "epochs" not in wide or wide["epochs"].isna().all():
        raise Skip("cell_configs.yaml is missing or does not match cells.json, so epochs are unknown")
    metric = primary_metric(wide)
    label = LABELS.get(metric, metric)
    done = wide[(wide["status"] == "done") & wide[metric].notna() & wide["epochs"].notna()]
    if done["epochs"].round(6).nunique() < 2:
        ep = sorted(done["epochs"].round(3).unique())
        raise Skip(f"every finished cell's generator trains for the same number of epochs "
                   f"({', '.join(f'{e:g}' for e in ep) or 'no finished cell'}; epochs = steps * batch_size / train_images)")
    group = ["prior", "loss"] + [k for k in ("lambda", "dataset", "tokenizer") if done[k].nunique() > 1]
    n = done.groupby(group)["epochs"].nunique()
    keep = done.set_index(group).index.isin(n[n >= 2].index)
    if not keep.any():
        raise Skip("cells differ in generator epochs, but no (prior, loss) has finished cells at two or more of them")
    fig = _series_lines(done[keep], "epochs", group, f"{title}: {label} against generator training",
                        "generator epochs (steps × batch / train images)", False, metric)
    single = done.loc[~keep].drop_duplicates(group)
    caption = (f"One line per (prior, loss), mean {label} over seeds at each generator schedule, bars ± one std. "
               "Compare the shape with the paper's Table 3 (gFID-50K against epochs).")
    if len(single):
        caption += " Not shown (one schedule only): " + ", ".join(_name(r, group) for _, r in single.iterrows()) + "."
    return fig, caption


def samples_figure(sweep_dir: Path, cells: pd.DataFrame, prior: str) -> tuple[Any, str]:
    import matplotlib.pyplot as plt
    from PIL import Image
    cells = cells.sort_values(["loss", "lambda", "generator", "tokenizer", "seed"])
    fig, axes = plt.subplots(len(cells), 2, figsize=(10, 2.3 * len(cells) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]}, layout="constrained")
    for i, (_, c) in enumerate(cells.iterrows()):
        for j, (name, what) in enumerate(IMAGES):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([]), ax.grid(False)
            path = sweep_dir / "cells" / str(c["cell_id"]) / name
            if path.exists():
                with Image.open(path) as im:
                    ax.imshow(im.convert("RGB"), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, f"no {name}\n(cell {c['status']})", ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title(what, fontsize=9)
        shown = dict.fromkeys([primary_metric(cells), "gfid", "rfid"])
        num = " · ".join(f"{LABELS[m]} {c[m]:.4g}" for m in shown if not math.isnan(as_float(c.get(m))))
        axes[i, 0].set_ylabel(f"{c['label']}\n{c['generator']}\n{num or c['status']}", fontsize=8,
                              rotation=0, ha="right", va="center")
    fig.suptitle(f"prior {prior}: samples and reconstructions")
    return fig, (f"Every cell with prior '{prior}', one row each (label: prior/loss(λ)/seed, generator preset, "
                 "its generation and reconstruction metrics).")


# ---------------------------------------------------------------- ranking and convergence figures

def _rank_label(r: pd.Series) -> str:
    text = f"{int(r['rank'])}. {r['prior']}/{r['loss']} λ={float(r['lambda']):g} (n={int(r['n_seeds'])})"
    return text + (f" · paper #{int(r['paper_rank'])}" if not pd.isna(r["paper_rank"]) else "")


def _floor_line(ax: Any, floor: float | None, vertical: bool) -> None:
    """The real-vs-real floor as a dotted line: no generator is expected to get past it."""
    if floor is None:
        return
    (ax.axvline if vertical else ax.axhline)(floor, color="grey", ls=":", lw=1, label="real-vs-real floor")


def ranking_figure(table: pd.DataFrame, corr: pd.DataFrame, floors: dict[str, dict[str, float]],
                   title: str) -> tuple[Any, str]:
    """Each ranked prior's mean of the primary metric with its 95% t-interval over seeds, best on top."""
    import matplotlib.pyplot as plt
    ranked = table[table["rank"].notna()]
    if ranked.empty:
        raise Skip("no finished cell has the primary metric: nothing to rank")
    metric = str(ranked["metric"].iloc[0])
    label = LABELS.get(metric, metric)
    groups = list(ranked.groupby(SETTING, sort=True))
    pal = palette(list(ranked["prior"]))
    # One panel per setting, stacked: the long prior labels sit left of their own panel only.
    sizes = [len(g) for _, g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 0.45 * sum(sizes) + 1.4 * len(groups)), squeeze=False,
                             gridspec_kw={"height_ratios": [n + 1.5 for n in sizes]}, layout="constrained")
    for ax, (setting, grp) in zip(axes[:, 0], groups):
        grp = grp.sort_values("mean", kind="mergesort")
        for y, (_, r) in enumerate(grp.iterrows()):
            ci, color = as_float(r["ci95"]), pal[r["prior"]]
            ax.errorbar(r["mean"], y, xerr=None if math.isnan(ci) else ci, fmt="o", color=color, capsize=4, ms=7,
                        mfc="white" if int(r["n_seeds"]) < 2 else color)
        ax.set_yticks(range(len(grp)), [_rank_label(r) for _, r in grp.iterrows()], fontsize=8)
        ax.set_ylim(len(grp) - 0.5, -0.5)  # rank 1 on top
        _floor_line(ax, floors.get(str(setting[0]), {}).get(metric), vertical=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel(f"{label}, mean over seeds (lower is better)")
        ax.set_title(" / ".join(map(str, setting)), fontsize=9)
    fig.suptitle(f"{title}: priors ranked by {label} (bars: 95% t-interval over seeds)")
    caption = (f"Priors ordered by their mean {label} over seeds (best on top), each at its best lambda; bars: "
               "95% Student-t interval of the mean over seeds (hollow marker: one seed, no interval). "
               "'paper #k': rank of the matching row of the paper's Table 1 (gFID-5K). Which neighbours "
               "Welch's t-test tells apart: ranking.md.")
    for _, c in corr.iterrows():
        if not math.isnan(c["spearman_rho"]):
            caption += (f" Spearman's rho with the paper ({c['generator']} generator): {c['spearman_rho']:.2f}, "
                        f"95% seed-bootstrap interval [{c['rho_lo']:.2f}, {c['rho_hi']:.2f}].")
    return fig, caption


def snapshot_columns(wide: pd.DataFrame, metric: str) -> dict[int, str]:
    """{percent of generator training: column} of the EMA snapshots of ``metric`` that hold values."""
    found = {}
    for c in wide.columns:
        m = SNAP.match(str(c))
        if m and m.group(2) == metric and pd.to_numeric(wide[c], errors="coerce").notna().any():
            found[int(m.group(1))] = c
    return dict(sorted(found.items()))


def _snap_floor(metric: str) -> str:
    """The floor measured at the snapshots' sample count (fd_domain -> floor_fd_snap_domain)."""
    return metric.replace("_domain", "_snap_domain") if metric.endswith("_domain") else f"{metric}_snap"


def _final_text(long: pd.DataFrame, metric: str) -> str:
    if (long.loc[long["percent"] == 100, "column"] == metric).all():
        return f"the `{metric}` column itself"
    return (f"`snap100_{metric}`, the final EMA scored like the snapshots, at their sample count; it can differ "
            f"from `{metric}`, which uses more samples")


def convergence_summary(wide: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """(metric, long frame): per setting, prior at its best lambda (as ranked) and snapshot percent:
    mean, std, n, ci95 over seeds and the step. 100% is ``snap100_<metric>`` where the evaluation
    scored the final EMA like the snapshots (same sample count: FD is biased by the count, so
    only equal counts make one curve), else the metric's own column."""
    metric = primary_metric(wide)
    snaps = snapshot_columns(wide, metric)
    if not snaps:
        raise Skip(f"results.csv has no EMA snapshot columns for {metric} (snapNNN_{metric}): the generator "
                   "recorded no snapshots")
    cols = snaps if 100 in snaps else {**snaps, 100: metric}
    steps = {p: f"snap{p:03d}_step" for p in cols if f"snap{p:03d}_step" in wide}
    group = SETTING + ["prior", "loss", "lambda"]
    # The best lambda is picked on the final metric, as in the ranking, whatever the 100% point is.
    summ = over_seeds(wide, group, list(dict.fromkeys([*cols.values(), metric, *steps.values()])), require=metric,
                      sort=True)
    rows = []
    for _, grp in summ.groupby(SETTING, sort=True):
        for _, r in _best_lambda(grp, metric).iterrows():
            for pct, c in cols.items():
                rows.append({**{k: r[k] for k in group}, "n_seeds": r["n_seeds"], "percent": pct, "mean": r[c],
                             "std": r[f"{c}_std"], "n": r[f"{c}_n"], "ci95": r[f"{c}_ci95"],
                             "step": r[steps[pct]] if pct in steps else math.nan, "column": c})
    return metric, pd.DataFrame(rows)


def snapshot_agreement(long: pd.DataFrame) -> pd.DataFrame:
    """Per setting and snapshot before the end: Spearman's rho of that snapshot's ranking of the
    priors against the final one (over priors with both values; undefined below MIN_SHARED) and
    whether the two orders are identical."""
    from scipy.stats import rankdata, spearmanr
    rows = []
    for setting, grp in long.groupby(SETTING, sort=True):
        final = grp[grp["percent"] == 100].set_index(["prior", "loss"])["mean"]
        for pct, snap in grp[grp["percent"] < 100].groupby("percent", sort=True):
            both = pd.concat([snap.set_index(["prior", "loss"])["mean"], final], axis=1, keys=["snap", "final"]).dropna()
            rho = p = math.nan
            if len(both) >= MIN_SHARED:
                rho, p = (float(v) for v in spearmanr(both["snap"], both["final"]))
            same = bool(np.array_equal(rankdata(both["snap"], "min"), rankdata(both["final"], "min")))
            rows.append({**dict(zip(SETTING, setting)), "percent": int(pct), "n_priors": len(both),
                         "spearman_rho": rho, "p_value": p, "same_order": same})
    return pd.DataFrame(rows, columns=SETTING + ["percent", "n_priors", "spearman_rho", "p_value", "same_order"])


# Issue #16's target for telling priors apart: every prior's 95% half-width over seeds at most this
# share of the range of the priors' means (the same rule the README applies to the mini-paper's cells).
SEPARATION_SHARE = 0.25


def snapshot_separation(long: pd.DataFrame) -> pd.DataFrame:
    """Per setting and snapshot, the end (100%) included: the range of the priors' means, the
    widest 95% half-width over seeds and its prior, and how many priors' half-widths are at most
    SEPARATION_SHARE of the range, i.e. at which generator length seed noise is small beside the
    spread between priors. Half-widths need two seeds; with fewer, ``n_with_interval`` is 0."""
    rows = []
    for setting, grp in long.groupby(SETTING, sort=True):
        for pct, snap in grp.groupby("percent", sort=True):
            snap = snap[snap["mean"].notna()]
            spread = float(snap["mean"].max() - snap["mean"].min()) if len(snap) >= 2 else math.nan
            ci = snap["ci95"][snap["ci95"].notna()]
            widest = snap.loc[ci.idxmax()] if len(ci) else None
            rows.append({**dict(zip(SETTING, setting)), "percent": int(pct), "n_priors": len(snap),
                         "n_with_interval": len(ci), "range": spread,
                         "max_ci95": float(ci.max()) if len(ci) else math.nan,
                         "widest": "" if widest is None else f"{widest['prior']}/{widest['loss']}",
                         "n_within": int((ci <= SEPARATION_SHARE * spread).sum())})
    return pd.DataFrame(rows, columns=SETTING + ["percent", "n_priors", "n_with_interval", "range", "max_ci95",
                                                 "widest", "n_within"])


def _of_setting(frame: pd.DataFrame, setting: tuple) -> pd.DataFrame:
    """The rows of one setting (dataset, tokenizer, generator); compared as text, as groupby keys
    and a frame's columns may hold the same value with different types."""
    return frame[(frame[SETTING].astype(str) == [str(v) for v in setting]).all(axis=1)]


def separation_sentence(sep: pd.DataFrame) -> str:
    """One setting's verdict: at which snapshots is every prior's half-width within the target?"""
    if sep.empty or sep["n_with_interval"].max() == 0:
        return "Seed noise against the spread needs two seeds per prior: not measured."
    met = sep.loc[(sep["n_with_interval"] == sep["n_priors"]) & (sep["n_within"] == sep["n_priors"]), "percent"]
    rule = f"every prior's 95% half-width at most {SEPARATION_SHARE:g} of the range of the means"
    if met.empty:
        return f"Seed noise is not small beside the spread at any snapshot ({rule})."
    return f"Seed noise is small beside the spread ({rule}) at {', '.join(f'{p}%' for p in met)}."


def stability_sentence(agree: pd.DataFrame) -> str:
    """One setting's verdict: is the order of the priors the same at every snapshot as at the end?"""
    if agree.empty:
        return "No snapshot before the final model: nothing to compare."
    if agree["n_priors"].max() < 2:
        return "Fewer than two priors: there is no ranking to compare."
    differ = agree.loc[~agree["same_order"], "percent"]
    if differ.empty:
        pcts = ", ".join(f"{p}%" for p in agree["percent"])
        return f"Stable: every snapshot ({pcts}) orders the priors as the final model does."
    later = agree.loc[agree["percent"] > differ.max(), "percent"]
    at = ", ".join(f"{p}%" for p in differ)
    if later.empty:
        return f"Not stable: the order of the priors still differs from the final one at {at}."
    return (f"The order settles by {later.min()}%: from there on every snapshot orders the priors as the final "
            f"model does; at {at} it differs.")


CONVERGENCE_NOTE = (
    "Each prior at its best lambda (as in ranking.md); the generator's EMA weights evaluated at {points}% of "
    "its training steps and at the end (100%: {final}). Entries: mean ± std [± half-width "
    "of the 95% Student-t interval] over seeds, then (#rank among the priors at that snapshot). Spearman's rho "
    "(scipy.stats.spearmanr) compares each snapshot's ranking with the final one and needs {min_shared} "
    "priors; `same order` means identical ranks. Orders compare means only: neighbours that the final "
    "ranking cannot tell apart (ranking.md, Welch's test) may swap by seed noise alone. The last table "
    "puts seed noise beside the spread at each snapshot: the range of the priors' means, the widest 95% "
    "half-width, and how many priors' half-widths are at most {share:g} of that range.\n")


def _rho_text(rho: float, n: int) -> str:
    if not math.isnan(rho):
        return f"{rho:.3f}"
    return f"undefined ({n} priors, needs {MIN_SHARED})" if n < MIN_SHARED else "undefined (tied ranks)"


def _snapshot_points(long: pd.DataFrame) -> str:
    """The snapshots' percents of generator training as the text names them, e.g. '25/50/75' (a
    sweep may keep others: grid=gen-length keeps 12.5%, named 12 as its column snap012 is)."""
    return "/".join(str(int(p)) for p in sorted(long["percent"].unique()) if int(p) != 100)


def convergence_markdown(long: pd.DataFrame, agree: pd.DataFrame, separation: pd.DataFrame, metric: str,
                         floors: dict[str, dict[str, float]]) -> str:
    from benchmark.aggregate import markdown
    label = LABELS.get(metric, metric)
    md = [f"# Convergence: {label} against generator training\n",
          CONVERGENCE_NOTE.format(final=_final_text(long, metric), min_shared=MIN_SHARED,
                                  points=_snapshot_points(long), share=SEPARATION_SHARE)]
    for setting, grp in long.groupby(SETTING, sort=True):
        md.append(f"## {' / '.join(map(str, setting))}\n")
        grp = grp.assign(rank=grp.groupby("percent")["mean"].rank(method="min"))
        cell = {(r["prior"], r["loss"], int(r["percent"])): (
            mean_pm(r["mean"], r["std"], r["ci95"]) + ("" if pd.isna(r["rank"]) else f" (#{int(r['rank'])})"))
            for _, r in grp.iterrows()}
        # Rows in the final ranking's order, one column per snapshot.
        table = grp[grp["percent"] == 100].sort_values("mean", kind="mergesort")[["prior", "loss", "lambda", "n_seeds"]]
        for p in sorted(grp["percent"].unique()):
            table[f"{p}%"] = [cell.get((a, b, int(p)), "–") for a, b in zip(table["prior"], table["loss"])]
        md.append(markdown(table, list(table.columns)))
        md.append("\n" + floor_sentence({m: v for m, v in floors.get(str(setting[0]), {}).items()
                                          if m in (metric, _snap_floor(metric)) or m.startswith("n_snap")}) + "\n")
        a = _of_setting(agree, setting)
        steps = grp.groupby("percent")["step"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else math.nan)
        rows = pd.DataFrame({"snapshot": [f"{p}%" for p in a["percent"]],
                             "step": [steps.get(p, math.nan) for p in a["percent"]],
                             "priors": a["n_priors"],
                             "Spearman's rho vs final": [_rho_text(v, n) for v, n in zip(a["spearman_rho"], a["n_priors"])],
                             "p": a["p_value"], "same order as final": a["same_order"].map({True: "yes", False: "no"})})
        md.append(markdown(rows, list(rows.columns)))
        md.append("\n" + stability_sentence(a) + "\n")
        sep = _of_setting(separation, setting)
        spread = pd.DataFrame({
            "snapshot": [f"{p}%" for p in sep["percent"]],
            "step": [steps.get(p, math.nan) for p in sep["percent"]],
            "range of the means": sep["range"],
            "widest 95% half-width": [f"{w:.3g} ({who})" if who else "–" for w, who in zip(sep["max_ci95"], sep["widest"])],
            "half-width / range": sep["max_ci95"] / sep["range"],
            f"priors within {SEPARATION_SHARE:g} of the range": [
                f"{k} of {n}" if m else "–" for k, n, m in zip(sep["n_within"], sep["n_priors"], sep["n_with_interval"])]})
        md.append(markdown(spread, list(spread.columns)))
        md.append("\n" + separation_sentence(sep) + "\n")
    return "\n".join(md)


def convergence_figure(long: pd.DataFrame, metric: str, floors: dict[str, dict[str, float]],
                       title: str) -> Any:
    """The primary metric against the share of generator training, one line per prior (mean over
    seeds, 95% t-interval bars): our counterpart of the paper's gFID-against-epochs view."""
    import matplotlib.pyplot as plt
    label = LABELS.get(metric, metric)
    groups = list(long.groupby(SETTING, sort=True))
    pal = palette(list(long["prior"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4), squeeze=False)
    for ax, (setting, grp) in zip(axes[0], groups):
        for (prior, loss, lam), line in grp.groupby(["prior", "loss", "lambda"], sort=True):
            line = line.sort_values("percent")
            color = pal[prior]
            ax.plot(line["percent"], line["mean"], marker="o", color=color, ls="-" if loss == PAPER_LOSS else "--",
                    label=f"{prior}/{loss} λ={float(lam):g}")
            ok = line["ci95"].notna()
            if ok.any():  # one seed: the point alone, no bar
                ax.errorbar(line.loc[ok, "percent"], line.loc[ok, "mean"], yerr=line.loc[ok, "ci95"], fmt="none",
                            ecolor=color, capsize=3, alpha=0.8)
        at = floors.get(str(setting[0]), {})
        _floor_line(ax, at.get(_snap_floor(metric), at.get(metric)), vertical=False)
        pcts = sorted(grp["percent"].unique())
        steps = grp.groupby("percent")["step"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else math.nan)
        ax.set_xticks(pcts, [f"{p}%" + (f"\n{steps[p]:g} steps" if not math.isnan(steps.get(p, math.nan)) else "")
                             for p in pcts])
        ax.set_xlabel("generator training (share of its steps; EMA weights)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.set_title(" / ".join(map(str, setting)), fontsize=9)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    fig.suptitle(f"{title}: {label} against generator training (mean over seeds, 95% t-interval)")
    return fig


def convergence(wide: pd.DataFrame, title: str) -> tuple[Any, str, str]:
    """(figure, caption, convergence.md); raises Skip without snapshot columns."""
    metric, long = convergence_summary(wide)
    floors = floor_values(wide)
    agree, separation = snapshot_agreement(long), snapshot_separation(long)
    md = convergence_markdown(long, agree, separation, metric, floors)
    label = LABELS.get(metric, metric)
    caption = (f"Mean {label} over seeds of each prior (at its best lambda) at {_snapshot_points(long)}/100% "
               "of generator training, EMA weights; bars: 95% Student-t interval over seeds (none with one seed); dashed: "
               "losses other than dm (the kl baseline); dotted: the real-vs-real floor. Compare the shape with "
               "the paper's gFID against epochs (Table 3).")
    n = pd.to_numeric(wide.get("snapshot_n_samples", pd.Series(dtype=float)), errors="coerce").dropna()
    if n.nunique() == 1:
        caption += f" Snapshots scored on {int(n.iloc[0])} generated samples each."
    for setting, a in agree.groupby(SETTING, sort=True):
        sep = _of_setting(separation, setting)
        caption += f" {' / '.join(map(str, setting))}: {stability_sentence(a)} {separation_sentence(sep)}"
    return convergence_figure(long, metric, floors, title), caption, md


# ---------------------------------------------------------------- training curves (tokenizer latents, teacher)

LATENT_CURVE, TEACHER_CURVE = "latent_curve.json", "teacher_curve.json"
# The tokenizer does not see the generator: cells that differ only in it share one tokenizer run.
CURVE_KEYS = ["dataset", "tokenizer", "prior", "loss", "lambda"]
SETTLE_SHARE = 0.25  # the last quarter of the match phase ...
SETTLE_TOL = 0.10    # ... must change SWD by less than 10% (relative) for the run to count as settled
SETTLE_RULE = (f"A run settled when SWD to p_ref changed by less than {SETTLE_TOL:.0%} (relative) over the last "
               f"{SETTLE_SHARE:.0%} of the match phase: abs(SWD(end) - SWD(q)) / SWD(q) < {SETTLE_TOL:g}, where "
               f"q = end - {SETTLE_SHARE:g} x (end - start), start is the last recorded iteration before matching "
               "(the state it started from), end the last match-phase point, and SWD(q) is interpolated linearly "
               "between recorded points. With several seeds: `yes` when every seed settled, `no` when none did, "
               "else how many did; `rel. change` is the largest over the seeds.")


def _run_root(sweep_dir: Path) -> Path:
    # The layout aggregate.main and export.export assume: runs/sweeps/<sweep> -> runs/
    return sweep_dir.resolve().parent.parent


def stage_file(sweep_dir: Path, cell: dict[str, Any], stage: str, name: str,
               exported: str | None = None) -> Path | None:
    """A file of the cell's ``stage`` run, or None when the cell has no such stage or file.
    An exported folder keeps per-cell files under cells/<cell_id>/ (as ``exported``, default
    ``name``); a sweep folder under runs/sweeps/ has the run directory
    <run_root>/stages/<stage>/<run_key>/ two levels up."""
    key = cell.get("nodes", {}).get(stage)
    if key is None:
        return None
    where = [sweep_dir / "cells" / cell["cell_id"] / (exported or name)] if cell.get("cell_id") else []
    where.append(_run_root(sweep_dir) / "stages" / stage / key / name)
    return next((p for p in where if p.is_file()), None)


def load_latent_curves(sweep_dir: Path) -> pd.DataFrame:
    """One row per recorded point of each distinct tokenizer run that wrote latent_curve.json:
    CURVE_KEYS, seed, run (its run key), iter, phase, latent_std, latent_mean, swd_to_prior."""
    cols = CURVE_KEYS + ["seed", "run", "iter", "phase", "latent_std", "latent_mean", "swd_to_prior"]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cell in read_json(sweep_dir / "cells.json"):
        run = cell.get("nodes", {}).get("tokenizer")
        path = None if run in seen else stage_file(sweep_dir, cell, "tokenizer", LATENT_CURVE)
        if path is None:
            continue
        seen.add(run)
        keys = {k: cell["keys"][k] for k in CURVE_KEYS + ["seed"]}
        rows += [{**keys, "run": run, **point} for point in read_json(path)]
    df = pd.DataFrame(rows, columns=cols)
    for c in ("iter", "latent_std", "latent_mean", "swd_to_prior", "lambda"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df.sort_values(["run", "iter"], kind="mergesort").reset_index(drop=True)


def phase_boundaries(run: pd.DataFrame) -> list[tuple[float, str]]:
    """(iteration, phase that starts there) where consecutive points change phase. A point is
    labelled with the phase of the iteration before it, so the last point of a phase is the
    boundary (exact when stats_every divides the phase lengths, else the last point before it)."""
    run = run.sort_values("iter")
    ph, it = run["phase"].tolist(), run["iter"].tolist()
    return [(float(it[i]), ph[i + 1]) for i in range(len(ph) - 1) if ph[i] != ph[i + 1]]


def match_end(run: pd.DataFrame) -> dict[str, Any]:
    """Latent std and SWD at the end of one run's match phase and whether SWD settled (SETTLE_RULE)."""
    run = run.sort_values("iter")
    match = run[run["phase"] == "match"]
    out: dict[str, Any] = {"std_end": math.nan, "swd_end": math.nan, "rel_change": math.nan, "settled": None}
    if match.empty:
        return out | {"why": "no match-phase point"}
    before = run[run["iter"] < match["iter"].min()].tail(1)  # the state matching started from
    pts = pd.concat([before, match])
    start, end = float(pts["iter"].iloc[0]), float(match["iter"].iloc[-1])
    out.update(std_end=float(match["latent_std"].iloc[-1]), swd_end=float(match["swd_to_prior"].iloc[-1]))
    if len(pts) < 2 or end <= start:
        return out | {"why": "one point in the match phase"}
    q = end - SETTLE_SHARE * (end - start)
    swd_q = float(np.interp(q, pts["iter"].to_numpy(float), pts["swd_to_prior"].to_numpy(float)))
    change = abs(out["swd_end"] - swd_q)
    rel = change / abs(swd_q) if swd_q != 0 else (0.0 if change == 0 else math.inf)
    return out | {"rel_change": rel, "settled": bool(rel < SETTLE_TOL)}


def _spread(v: pd.Series) -> str:
    """The mean over seeds, with the min-max range when there are several."""
    v = v.dropna()
    if v.empty:
        return "–"
    return f"{v.mean():.4g}" if len(v) == 1 else f"{v.mean():.4g} ({v.min():.4g}–{v.max():.4g})"


def _settled_text(s: pd.Series) -> str:
    known = s.dropna()
    if known.empty:
        return "unknown (too few match-phase points)"
    k = int(known.astype(bool).sum())
    text = "yes" if k == len(known) else ("no" if k == 0 else f"{k}/{len(known)} seeds")
    return text + (f" ({len(s) - len(known)} seed(s) unknown)" if len(known) < len(s) else "")


def latent_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per CURVE_KEYS group: n_seeds, end-of-match std and SWD, largest relative SWD change
    over the last quarter of matching, settled (see SETTLE_RULE)."""
    per_run = pd.DataFrame([{**dict(zip(CURVE_KEYS, keys)), **match_end(run)}
                            for (*keys, _), run in curves.groupby(CURVE_KEYS + ["run"], sort=True)])
    rows = []
    for keys, grp in per_run.groupby(CURVE_KEYS, sort=True):
        rel = grp["rel_change"].dropna()
        rows.append({**dict(zip(CURVE_KEYS, keys)), "n_seeds": len(grp),
                     "latent std at match end": _spread(grp["std_end"]),
                     "SWD at match end": _spread(grp["swd_end"]),
                     "rel. change of SWD, last quarter": f"{rel.max():.1%}" if len(rel) else "–",
                     "settled": _settled_text(grp["settled"])})
    return pd.DataFrame(rows)


def latent_curves_markdown(summary: pd.DataFrame) -> str:
    from benchmark.aggregate import markdown
    md = ["# Latent statistics over tokenizer training\n",
          "Statistics of a fixed batch of 512 training images' latents, in the space the matching loss compares "
          "with p_ref (latent_curve.json of each tokenizer run; the target std is 1 for N(0, I) and for feature "
          "banks). Values at the last recorded point of the match phase: the mean over seeds, (min–max) with "
          f"several seeds. {SETTLE_RULE}\n"]
    cols = ["prior", "loss", "lambda", "n_seeds", "latent std at match end", "SWD at match end",
            "rel. change of SWD, last quarter", "settled"]
    for setting, grp in summary.groupby(["dataset", "tokenizer"], sort=True):
        md.append(f"## {' / '.join(map(str, setting))}\n")
        md.append(markdown(grp, cols))
    return "\n".join(md)


def _curve_label(keys: dict[str, Any], vary: list[str]) -> str:
    """prior/loss λ, then the dataset or tokenizer preset where the sweep has several."""
    return _name(pd.Series(keys), ["prior", "loss", "lambda"] + [k for k in ("dataset", "tokenizer") if k in vary])


def latent_curves_figure(curves: pd.DataFrame, title: str) -> Any:
    """Latent std and SWD to p_ref against tokenizer iteration: per (prior, loss, lambda) the mean
    over seeds and a min-max band, phase boundaries as vertical lines, std 1 dotted."""
    import matplotlib.pyplot as plt
    vary = [k for k in ("dataset", "tokenizer") if curves[k].nunique() > 1]
    groups = [(_curve_label(dict(zip(CURVE_KEYS, keys)), vary), grp)
              for keys, grp in curves.groupby(CURVE_KEYS, sort=True)]
    pal = palette([label for label, _ in groups])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, col, ylabel in ((axes[0], "latent_std", "latent std"), (axes[1], "swd_to_prior", "SWD to p_ref")):
        for label, grp in groups:
            wide = grp.pivot_table(index="iter", columns="run", values=col, aggfunc="mean").sort_index()
            color = pal[label]
            ls = "-" if grp["loss"].iloc[0] == PAPER_LOSS else "--"
            n = wide.shape[1]
            ax.plot(wide.index, wide.mean(axis=1), color=color, ls=ls, label=f"{label} ({n} seed{'s' * (n > 1)})")
            if n > 1:  # the band is the seeds' range; one seed has none
                ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=color, alpha=0.2, lw=0)
        ax.set_xlabel("tokenizer iteration")
        ax.set_ylabel(ylabel)
    vals = curves["swd_to_prior"].dropna()
    if len(vals) and vals.min() > 0 and vals.max() / vals.min() > 20:  # SWD often falls by orders of magnitude
        axes[1].set_yscale("log")
    target = axes[0].axhline(1.0, color="k", ls=":", lw=1, label="std 1 (N(0, I), feature banks)")
    bounds = sorted({b for _, run in curves.groupby("run") for b in phase_boundaries(run)})
    for ax in axes:
        for it, phase in bounds:
            ax.axvline(it, color="0.5", ls="-.", lw=0.8)
            ax.text(it, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="0.35")
    handles, _ = axes[1].get_legend_handles_labels()  # one legend for both panels, the std target included
    axes[1].legend(handles=handles + [target], loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    fig.suptitle(f"{title}: latents of a fixed batch over tokenizer training (mean over seeds, band: min–max)")
    return fig


def latent_curves(sweep_dir: Path, title: str) -> tuple[Any, str, str]:
    """(figure, caption, latent_curves.md); raises Skip when no tokenizer run wrote a curve."""
    curves = load_latent_curves(sweep_dir)
    if curves.empty:
        raise Skip(f"no cell's tokenizer run has {LATENT_CURVE} (written only when tokenizer.stats_every > 0)")
    summary = latent_summary(curves)
    settled = summary["settled"].eq("yes").sum()
    caption = ("Std of a fixed batch's latents and their sliced Wasserstein distance to samples of p_ref, in the "
               "space the matching loss compares, against tokenizer iteration; mean over seeds, band: min–max over "
               "seeds; dashed: losses other than dm; vertical lines: phase boundaries (the label names the phase "
               "that starts); dotted: std 1, the target for N(0, I) and feature banks (other priors have their "
               f"own scale). {settled} of {len(summary)} prior/loss/λ settled by the end of matching "
               f"(latent_curves.md: SWD changed < {SETTLE_TOL:.0%} over the last quarter of the match phase).")
    return latent_curves_figure(curves, title), caption, latent_curves_markdown(summary)


def load_teacher_curves(sweep_dir: Path) -> list[dict[str, Any]]:
    """One entry per distinct teacher run with teacher_curve.json: run, label, the curve as
    (step, held-out FM loss) pairs, and its record's facts where the record is found."""
    users: dict[str, list[dict]] = {}
    paths: dict[str, Path] = {}
    records: dict[str, Path | None] = {}
    for cell in read_json(sweep_dir / "cells.json"):
        run = cell.get("nodes", {}).get("teacher")
        if run is None:
            continue
        users.setdefault(run, []).append(cell["keys"])
        if run not in paths and (p := stage_file(sweep_dir, cell, "teacher", TEACHER_CURVE)) is not None:
            paths[run] = p
            records[run] = stage_file(sweep_dir, cell, "teacher", "record.json", exported="teacher.json")
    datasets = {k["dataset"] for run in paths for k in users[run]}
    teachers = []
    for run, path in paths.items():
        keys = users[run]
        # The teacher learns p_ref: name it by the prior(s) and seed(s) of the cells that use it.
        label = "/".join(sorted({str(k["prior"]) for k in keys})) + " s" + ",".join(
            sorted({str(k["seed"]) for k in keys}))
        if len(datasets) > 1:
            label = f"{keys[0]['dataset']} {label}"
        curve = [(float(s), float(v)) for s, v in read_json(path).get("step_heldout_fm", [])]
        facts = read_json(records[run]).get("facts", {}) if records[run] is not None else {}
        teachers.append({"run": run, "label": label, "curve": sorted(curve), "facts": facts})
    labels = [t["label"] for t in teachers]
    for t in teachers:  # two teachers the keys cannot tell apart: their run keys do
        if labels.count(t["label"]) > 1:
            t["label"] += f" ({t['run']})"
    return sorted(teachers, key=lambda t: t["label"])


def _teacher_steps(t: dict[str, Any]) -> str:
    facts, curve = t["facts"], t["curve"]
    if facts.get("teacher_steps_run") is not None:
        stopped = f", stopped: {facts['teacher_stopped']}" if facts.get("teacher_stopped") else ""
        return f"{int(facts['teacher_steps_run'])} steps run{stopped}"
    # No record beside the curve: the last held-out evaluation is a lower bound on the steps run.
    if not curve:
        return "no steps"
    return f"at least {int(curve[-1][0])} steps run (last held-out evaluation; no record found)"


def teacher_curves_markdown(teachers: list[dict[str, Any]]) -> str:
    md = ["# Teachers: held-out flow-matching loss\n",
          "Each dm teacher is trained on samples of p_ref until its loss on a fixed held-out set plateaus "
          "(teacher_curve.json); one line per distinct teacher run.\n"]
    for t in teachers:
        final = f"final held-out FM loss {t['curve'][-1][1]:.4g} at step {int(t['curve'][-1][0])}" \
            if t["curve"] else "no held-out evaluation recorded"
        md.append(f"- {t['label']} (`teacher/{t['run']}`): {_teacher_steps(t)}; {final}.\n")
    return "\n".join(md)


def teacher_curves_figure(teachers: list[dict[str, Any]], title: str) -> Any:
    import matplotlib.pyplot as plt
    pal = palette([t["label"] for t in teachers])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for t in teachers:
        steps, loss = zip(*t["curve"])
        ax.plot(steps, loss, marker="o", ms=3, color=pal[t["label"]], label=t["label"])
    ax.set_xlabel("teacher step")
    ax.set_ylabel("held-out flow-matching loss")
    ax.set_title(f"{title}: dm teachers' held-out loss", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    return fig


def teacher_curves(sweep_dir: Path, title: str) -> tuple[Any, str, str]:
    """(figure, caption, teacher_curves.md); raises Skip when no teacher run wrote a curve."""
    teachers = load_teacher_curves(sweep_dir)
    drawn = [t for t in teachers if t["curve"]]
    if not drawn:
        raise Skip(f"no cell's teacher run has a non-empty {TEACHER_CURVE} (written by dm teachers with "
                   "loss.teacher_plateau set)")
    caption = ("Flow-matching loss of each dm teacher on a fixed held-out set of p_ref samples (fixed t and noise) "
               f"against its training step, one line per distinct teacher run ({len(drawn)}); a curve still falling "
               "at its end is a teacher cut off early, whose bias the dm gradient inherits (teacher_curves.md).")
    return teacher_curves_figure(drawn, title), caption, teacher_curves_markdown(teachers)


# ---------------------------------------------------------------- the paper's own figures

def paper_figures(results: Path, out: Path) -> list[dict[str, Any]]:
    """The paper's Tables 1-3 drawn the way we draw ours, so the shapes can be compared."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    made = []
    t1 = read_paper_table(results, PAPER_TABLE1)
    if t1 is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, y, ylab in ((axes[0], "rfid", "rFID"), (axes[1], "psnr", "PSNR (dB)")):
            sns.scatterplot(data=t1, x="gfid_5k", y=y, hue="kind", s=80, ax=ax, legend=ax is axes[-1])
            for _, r in t1.iterrows():
                ax.annotate(r["reference"], (r["gfid_5k"], r[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
            ax.set_xlabel("gFID-5K (lower: easier to generate)")
            ax.set_ylabel(ylab)
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle("DMVAE paper, Table 1: reference distributions (ImageNet 256)")
        made.append({"name": "paper_table1_tradeoff", "files": _save(fig, out, "paper_table1_tradeoff"),
                     "title": "Paper Table 1: reconstruction vs generation per reference distribution",
                     "caption": "One point per reference distribution of the paper's Table 1 (arXiv 2512.07778 v2)."})
    t2 = read_paper_table(results, PAPER_TABLE2)
    if t2 is not None:
        # Table 2's lambda rows; "default" is lambda = 10 (the table's header comment).
        lam = t2[t2["setting"].str.startswith("lambda=") | (t2["setting"] == "default")].copy()
        lam["lambda"] = [10.0 if s == "default" else float(s.split("=")[1]) for s in lam["setting"]]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
        for ax, y, ylab in zip(axes, ("gfid_5k", "rfid", "psnr"), ("gFID-5K", "rFID", "PSNR (dB)")):
            sns.lineplot(data=lam.sort_values("lambda"), x="lambda", y=y, marker="o", ax=ax)
            ax.set_xscale("log")
            ax.set_xlabel("λ_DM (log scale)")
            ax.set_ylabel(ylab)
        fig.suptitle("DMVAE paper, Table 2: the DM weight (DINO prior, ImageNet 256)")
        fig.tight_layout()
        made.append({"name": "paper_table2_lambda", "files": _save(fig, out, "paper_table2_lambda"),
                     "title": "Paper Table 2: gFID-5K, rFID and PSNR against lambda",
                     "caption": "The lambda rows of the paper's Table 2; its default is lambda = 10."})
    t3 = read_paper_table(results, PAPER_TABLE3)
    if t3 is not None:
        multi = t3.groupby("method").filter(lambda g: len(g) > 1)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        sns.lineplot(data=multi, x="epochs", y="gfid", hue="method", marker="o", ax=ax)
        ax.set_xlabel("generator epochs")
        ax.set_ylabel("gFID-50K (no CFG)")
        ax.set_title("DMVAE paper, Table 3: gFID against generator training")
        made.append({"name": "paper_table3_epochs", "files": _save(fig, out, "paper_table3_epochs"),
                     "title": "Paper Table 3: gFID-50K against generator epochs",
                     "caption": "Methods of the paper's Table 3 reported at more than one training length."})
    return made


# ---------------------------------------------------------------- one sweep

def render_sweep(sweep_dir: Path, out: Path, results: Path) -> dict[str, Any]:
    """Draw every figure a sweep supports into ``out`` and write manifest.json there."""
    _theme()
    name = sweep_dir.name
    wide = load_sweep(sweep_dir)
    old = read_json(out / "manifest.json") if (out / "manifest.json").exists() else {}
    figs: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    tables = ["ranking.csv", "ranking.md", "ranking_spearman.csv"]
    label = LABELS.get(primary_metric(wide), "gFID")
    table, corr = ranking(wide, read_paper_table(results, PAPER_TABLE1))
    floors = floor_values(wide)
    write_text(out / "ranking.csv", table.to_csv(index=False))
    write_text(out / "ranking_spearman.csv", corr.to_csv(index=False))
    write_text(out / "ranking.md", ranking_markdown(table, corr, floors))
    for _, c in corr.iterrows():
        log.info("%s: ranking vs paper Table 1: %s", name,
                 f"rho={c['spearman_rho']:.3f} [{c['rho_lo']:.3f}, {c['rho_hi']:.3f}]"
                 if not math.isnan(c["spearman_rho"]) else c["note"])
    for md_name in ("convergence.md", "latent_curves.md", "teacher_curves.md"):
        (out / md_name).unlink(missing_ok=True)  # rewritten below only if the sweep supports it

    def draw_convergence() -> tuple[Any, str]:
        fig, caption, md = convergence(wide, name)
        write_text(out / "convergence.md", md)
        tables.append("convergence.md")
        return fig, caption

    def with_markdown(stem: str, make: Any) -> Any:
        """A drawer for plans whose maker also returns <stem>.md (written only when it draws)."""
        def draw() -> tuple[Any, str]:
            fig, caption, md = make(sweep_dir, name)
            write_text(out / f"{stem}.md", md)
            tables.append(f"{stem}.md")
            return fig, caption
        return draw

    plans = [("tradeoff", "Reconstruction vs generation", lambda: tradeoff_figure(wide, name)),
             ("gfid_vs_lambda", f"{label} against lambda", lambda: lambda_figure(wide, name)),
             ("gfid_vs_epochs", f"{label} against generator epochs", lambda: epochs_figure(wide, name)),
             ("ranking", f"Priors ranked by {label}, 95% intervals over seeds",
              lambda: ranking_figure(table, corr, floors, name)),
             ("convergence", f"{label} against generator training (EMA snapshots)", draw_convergence),
             ("latent_curves", "Latent std and SWD to p_ref over tokenizer training",
              with_markdown("latent_curves", latent_curves)),
             ("teacher_curves", "Held-out flow-matching loss of the dm teachers",
              with_markdown("teacher_curves", teacher_curves))]
    for prior in sorted(wide["prior"].unique()):
        plans.append((f"samples_{prior}", f"Samples and reconstructions: prior {prior}",
                      lambda p=prior: samples_figure(sweep_dir, wide[wide["prior"] == p], p)))
    for stem, title, draw in plans:
        try:
            fig, caption = draw()
        except Skip as e:
            log.info("%s: %s not drawn: %s", name, stem, e)
            skipped.append({"name": stem, "title": title, "reason": str(e)})
            continue
        figs.append({"name": stem, "title": title, "caption": caption, "files": _save(fig, out, stem)})
    manifest = {"sweep": name, "figures": figs, "skipped": skipped, "tables": tables}
    fresh = {f for fig in figs for f in fig["files"]}
    for fig in old.get("figures", []):  # figures this sweep no longer supports must not linger
        for f in fig.get("files", []):
            if f not in fresh:
                (out / f).unlink(missing_ok=True)
    write_json(out / "manifest.json", manifest)
    log.info("%s: %d figures, %d skipped -> %s", name, len(figs), len(skipped), out)
    return manifest


def run(results: Path, out_root: Path | None = None, sweeps: list[str] | None = None,
        report: bool = True) -> list[Path]:
    """Figures (and reports) of every exported sweep under ``results``; returns the sweep output dirs."""
    out_root = out_root or results
    found = find_sweeps(results)
    if sweeps:
        missing = set(sweeps) - {d.name for d in found}
        if missing:
            raise SystemExit(f"no exported sweep named {sorted(missing)} under {results}; "
                             f"found: {[d.name for d in found]}")
        found = [d for d in found if d.name in sweeps]
    if not found:
        log.warning("no exported sweep under %s (a folder with results.csv and cells.json)", results)
    _theme()
    paper_out = out_root / PAPER_DIR / "figures"
    paper = paper_figures(results, paper_out)
    if paper:
        write_json(paper_out / "manifest.json", {"sweep": PAPER_DIR, "figures": paper, "skipped": []})
    outs = []
    for d in found:
        render_sweep(d, out_root / d.name / "figures", results)
        if report:
            from benchmark.report import write_report
            write_report(d, out_root / d.name, paper_out)
        outs.append(out_root / d.name)
    return outs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmark.figures",
                                 description="Paper-style figures, ranking tables and HTML reports of every "
                                             "exported sweep, from the results folder alone.")
    ap.add_argument("--results", type=Path, default=Path("results"), help="the exported results folder (default: results)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write into OUT/<sweep>/figures, OUT/<sweep>/report.html and OUT/paper/figures "
                         "instead of into the results folder")
    ap.add_argument("--sweep", action="append", default=None, help="only this sweep (repeatable)")
    ap.add_argument("--no-report", action="store_true", help="figures and tables only, no HTML report")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        outs = run(a.results, a.out, a.sweep, report=not a.no_report)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    for d in outs:
        log.info("wrote %s", d)


if __name__ == "__main__":
    main()
