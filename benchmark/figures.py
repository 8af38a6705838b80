"""``python -m benchmark.figures``: paper-style figures of every exported sweep, from results/ alone.

Reads only what ``benchmark.export`` puts into ``results/<sweep>/`` (results.csv, cells.json,
cell_configs.yaml, cells/<cell_id>/*.png); nothing is trained and no run directory is needed.
For each sweep it writes into ``<out>/<sweep>/figures/`` (``<out>`` defaults to the results
folder itself), every figure as PNG and PDF:

    tradeoff.{png,pdf}         rFID and PSNR against gFID, mean ± std over seeds
    gfid_vs_lambda.{png,pdf}   gFID against the matching-loss weight (only if some line has 2+ lambdas)
    gfid_vs_epochs.{png,pdf}   gFID against the generator's epochs (only if cells differ in epochs)
    samples_<prior>.{png,pdf}  samples and reconstructions, one row per cell of that prior
    ranking.csv, ranking.md, ranking_spearman.csv   our ranking of the priors beside the paper's Table 1
    manifest.json              what was drawn (title, caption) and what was skipped, and why

and the paper's own figures from its tables into ``<out>/paper/figures/``. Then it writes the
HTML report of each sweep (``benchmark.report``). Figures that a sweep cannot support are not
drawn: the reason is logged and kept in manifest.json, never replaced by an empty plot.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from benchmark.aggregate import (KEY_COLS, SETTING, NothingToPlot as Skip, over_seeds,
                                 point_name as _name, tradeoff_figure)
from benchmark.export import PAPER_DIR, find_sweeps
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

METRICS = ["gfid", "rfid", "psnr"]
RANKING_COLS = SETTING + ["prior", "loss", "lambda", "n_seeds", "gfid", "gfid_std", "rfid", "psnr", "rank",
                          "paper_reference", "paper_gfid_5k", "paper_rank", "in_correlation",
                          "rank_shared", "paper_rank_shared", "note"]
SPEARMAN_COLS = SETTING + ["n_shared", "spearman_rho", "p_value", "shared", "note"]
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
    try:  # the same formula tests/test_presets.py checks against each preset's stated epochs
        return float(g["steps"]) * float(g["batch_size"]) / float(g["train_images"])
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

def ranking(wide: pd.DataFrame, paper: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our priors ranked by gFID (lower is better) beside the paper's Table 1, per setting.

    One row per (setting, prior, loss), at its best lambda (lowest mean gFID over seeds): the
    paper reports each reference at its own tuned lambda (10 data-derived, 1 synthetic). Returns
    (ranking, spearman), spearman with one row per setting.
    """
    from scipy.stats import spearmanr

    summ = over_seeds(wide, SETTING + ["prior", "loss", "lambda"], METRICS, require="gfid", sort=True)
    paper_gfid, paper_rank = {}, {}
    if paper is not None:
        paper_gfid = dict(zip(paper["reference"], paper["gfid_5k"]))
        paper_rank = dict(zip(paper["reference"], paper["gfid_5k"].rank(method="min").astype(int)))
    rows, corr = [], []
    for setting, grp in summ.groupby(SETTING, sort=True):
        best = grp.sort_values("gfid").drop_duplicates(["prior", "loss"])
        best = best.assign(rank=best["gfid"].rank(method="min").astype(int))
        best["paper_reference"] = [paper_reference(p, l) for p, l in zip(best["prior"], best["loss"])]
        best["paper_gfid_5k"] = best["paper_reference"].map(paper_gfid)
        best["paper_rank"] = best["paper_reference"].map(paper_rank).astype("Int64")
        # Two of our priors may stand for one paper row (dinov2 and ssl): the better one counts.
        best["in_correlation"] = best["paper_gfid_5k"].notna() & ~best.duplicated("paper_reference")
        # Ranks among the shared priors only: the two columns a reader compares side by side.
        shared = best[best["in_correlation"]]
        best["rank_shared"] = shared["gfid"].rank(method="min").astype("Int64")
        best["paper_rank_shared"] = shared["paper_gfid_5k"].rank(method="min").astype("Int64")
        rows.append(best)
        row = dict(zip(SETTING, setting), n_shared=len(shared), spearman_rho=math.nan, p_value=math.nan,
                   shared=", ".join(f"{p}/{l}={r}" for p, l, r in zip(shared["prior"], shared["loss"], shared["paper_reference"])))
        if paper is None:
            row["note"] = f"undefined: the paper's table ({PAPER_DIR}/{PAPER_TABLE1}) is missing"
        elif len(shared) < MIN_SHARED:
            row["note"] = (f"undefined: {len(shared)} prior(s) shared with the paper's Table 1, "
                           f"Spearman's rho needs at least {MIN_SHARED}")
        else:
            rho, p = spearmanr(shared["gfid"], shared["paper_gfid_5k"])
            if math.isnan(rho):
                row["note"] = "undefined: one of the two rankings is constant (ties)"
            else:
                row.update(spearman_rho=float(rho), p_value=float(p),
                           note=f"computed over {len(shared)} shared priors")
        corr.append(row)
    # Priors whose every cell failed: listed without a rank, so the table says why they are missing.
    failed = wide[~wide.set_index(SETTING + ["prior", "loss"]).index.isin(
        summ.set_index(SETTING + ["prior", "loss"]).index)]
    if len(failed):
        f = failed.drop_duplicates(SETTING + ["prior", "loss"])[SETTING + ["prior", "loss", "lambda"]].copy()
        f["n_seeds"] = 0
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


def ranking_markdown(table: pd.DataFrame, corr: pd.DataFrame) -> str:
    from benchmark.aggregate import markdown
    md = ["# Ranking of the priors by gFID (lower is better) beside the paper's Table 1\n",
          "Ours: best lambda per (prior, loss), mean over seeds of finished cells. Paper: gFID-5K on "
          "ImageNet 256 (arXiv 2512.07778 v2, Table 1). Only ranks are comparable, not the numbers.\n"]
    settings = table[SETTING].astype(str).drop_duplicates().sort_values(SETTING)
    for setting in settings.itertuples(index=False):
        sub = table[(table[SETTING].astype(str) == list(setting)).all(axis=1)]
        md.append(f"## {' / '.join(setting)}\n")
        sub = sub.astype(object).where(sub.notna(), None)  # pd.NA -> "–" like every other empty cell
        md.append(markdown(sub, [k for k in RANKING_COLS if k not in SETTING]))
        c = corr[(corr[SETTING].astype(str) == list(setting)).all(axis=1)]
        if c.empty:
            rho = "Spearman's rho: undefined: no finished cell in this setting"
        elif not math.isnan(c["spearman_rho"].iloc[0]):
            rho = f"Spearman's rho = {c['spearman_rho'].iloc[0]:.3f} (p = {c['p_value'].iloc[0]:.3g}, n = {c['n_shared'].iloc[0]})"
        else:
            rho = f"Spearman's rho: {c['note'].iloc[0]}"
        md.append(f"\n{rho}.\n")
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


def _series_lines(wide: pd.DataFrame, x: str, group: list[str], title: str, xlabel: str, logx: bool) -> Any:
    import matplotlib.pyplot as plt
    import seaborn as sns
    done = wide[(wide["status"] == "done") & wide["gfid"].notna()].copy()
    done["series"] = [_name(r, group) for _, r in done.iterrows()]
    done[x] = done[x].astype(float)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=done.sort_values(x), x=x, y="gfid", hue="series", style="loss", markers=True, dashes=False,
                 estimator="mean", errorbar="sd", err_style="bars", err_kws={"capsize": 3}, ax=ax)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gFID (lower is better)")
    ax.set_title(title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    return fig


def lambda_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    done = wide[(wide["status"] == "done") & wide["gfid"].notna()]
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
    fig = _series_lines(done[keep], "lambda", group, f"{title}: gFID against the matching-loss weight",
                        "λ (loss.lambda)" + (", log scale" if logx else ""), logx)
    single = done.loc[~keep].drop_duplicates(group)
    caption = ("One line per (prior, loss), mean gFID over seeds at each lambda, bars ± one std. "
               "The paper's Table 2 varies lambda for its DINO prior (see the paper figures).")
    if len(single):
        caption += " Not shown (one lambda only): " + ", ".join(_name(r, group) for _, r in single.iterrows()) + "."
    return fig, caption


def epochs_figure(wide: pd.DataFrame, title: str) -> tuple[Any, str]:
    if "epochs" not in wide or wide["epochs"].isna().all():
        raise Skip("cell_configs.yaml is missing or does not match cells.json, so epochs are unknown")
    done = wide[(wide["status"] == "done") & wide["gfid"].notna() & wide["epochs"].notna()]
    if done["epochs"].round(6).nunique() < 2:
        ep = sorted(done["epochs"].round(3).unique())
        raise Skip(f"every finished cell's generator trains for the same number of epochs "
                   f"({', '.join(f'{e:g}' for e in ep) or 'no finished cell'}; epochs = steps * batch_size / train_images)")
    group = ["prior", "loss"] + [k for k in ("lambda", "dataset", "tokenizer") if done[k].nunique() > 1]
    n = done.groupby(group)["epochs"].nunique()
    keep = done.set_index(group).index.isin(n[n >= 2].index)
    if not keep.any():
        raise Skip("cells differ in generator epochs, but no (prior, loss) has finished cells at two or more of them")
    fig = _series_lines(done[keep], "epochs", group, f"{title}: gFID against generator training",
                        "generator epochs (steps × batch / train images)", False)
    single = done.loc[~keep].drop_duplicates(group)
    caption = ("One line per (prior, loss), mean gFID over seeds at each generator schedule, bars ± one std. "
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
        num = " · ".join(f"{lab} {c[m]:.4g}" for m, lab in (("gfid", "gFID"), ("rfid", "rFID")) if not math.isnan(c[m]))
        axes[i, 0].set_ylabel(f"{c['label']}\n{c['generator']}\n{num or c['status']}", fontsize=8,
                              rotation=0, ha="right", va="center")
    fig.suptitle(f"prior {prior}: samples and reconstructions")
    return fig, (f"Every cell with prior '{prior}', one row each (label: prior/loss(λ)/seed, generator preset, "
                 "gFID and rFID of that cell).")


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
    plans = [("tradeoff", "Reconstruction vs generation", lambda: tradeoff_figure(wide, name)),
             ("gfid_vs_lambda", "gFID against lambda", lambda: lambda_figure(wide, name)),
             ("gfid_vs_epochs", "gFID against generator epochs", lambda: epochs_figure(wide, name))]
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
    table, corr = ranking(wide, read_paper_table(results, PAPER_TABLE1))
    write_text(out / "ranking.csv", table.to_csv(index=False))
    write_text(out / "ranking_spearman.csv", corr.to_csv(index=False))
    write_text(out / "ranking.md", ranking_markdown(table, corr))
    for _, c in corr.iterrows():
        log.info("%s: ranking vs paper Table 1: %s", name,
                 f"rho={c['spearman_rho']:.3f}" if not math.isnan(c["spearman_rho"]) else c["note"])
    manifest = {"sweep": name, "figures": figs, "skipped": skipped,
                "tables": ["ranking.csv", "ranking.md", "ranking_spearman.csv"]}
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
