"""Figures, ranking and HTML report from an exported results folder (synthetic, then the committed one)."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from benchmark import aggregate, export, figures, report
from benchmark.store import write_json, write_text

REPO = Path(__file__).resolve().parents[1]
STAGES = ["fid_ref", "reference", "tokenizer", "recon_eval", "generator", "gen_eval"]
# Our gFIDs order dinov2 < gaussian/dm < gaussian/kl < gmm, as the paper's Table 1 gFID-5K does
# (DINO 13.1 < Gaussian 26.6 < VAE baseline 27.3 < GMM 29.6), so Spearman's rho must be 1.
GFID = {("dinov2", "dm"): 40.0, ("gaussian", "dm"): 60.0, ("gaussian", "kl"): 65.0, ("gmm", "dm"): 70.0,
        ("text", "dm"): 50.0}
GEN_STEPS = {"cpu-tiny": 800, "cpu-small": 3200}


def _png(path: Path, size: tuple[int, int], shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, shade, shade)).save(path)


def _cell(root: Path, idx: int, prior: str, loss: str, lam: float, seed: int, generator: str = "cpu-tiny",
          fail: bool = False) -> tuple[dict, dict]:
    keys = {"dataset": "fashion_mnist", "prior": prior, "loss": loss, "lambda": lam, "tokenizer": "cpu-tiny",
            "generator": generator, "seed": seed}
    gfid = GFID[prior, loss] + 0.5 * seed + (1.0 if lam > 1 else 0.0) - (5.0 if generator == "cpu-small" else 0.0)
    # The primary metric fd_domain is gfid / 2 (same order, so every expectation on gfid holds for it),
    # with per-cell bootstrap bounds, the dataset's floors and EMA snapshots that only shrink towards it.
    fd = gfid / 2
    snaps = {f"snap{p:03d}_{k}": v for p, f in ((25, 1.6), (50, 1.3), (75, 1.1))
             for k, v in (("fd_domain", fd * f), ("step", GEN_STEPS[generator] * p // 100))}
    facts = {"tokenizer": {"latent_swd_to_prior": 0.1},
             "recon_eval": {"rfid": gfid / 4, "psnr": 20.0 + seed, "ssim": 0.8},
             "generator": {}, "gen_eval": {"gfid": gfid, "kid": 0.01, "precision": 0.5, "recall": 0.4,
                                           "n_samples": 100, "is": None, "fd_domain": fd, "fd_domain_lo": fd - 1,
                                           "fd_domain_hi": fd + 2, "floor_fd_domain": 3.0, "floor_gfid": 12.5,
                                           **snaps}}
    nodes = {}
    for stage in STAGES:
        key = f"{stage}-{idx:04d}"
        nodes[stage] = key
        d = root / "stages" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "stage.log", f"{stage} of cell {idx}\n")
        if fail and stage == "tokenizer":
            write_json(d / "failed.json", {"reason": "NonFiniteLossError: loss is nan at step 3"})
            break
        write_json(d / "record.json", {"facts": facts.get(stage, {}), "wall_time_s": 1.0, "device_hours": 1 / 3600})
        if stage == "tokenizer":
            write_text(d / "config.yaml", yaml.safe_dump({"prior": {"name": prior}, "seed": seed}))
        if stage == "gen_eval":
            _png(d / "samples.png", (51, 51), 40 + idx)
        if stage == "recon_eval":
            _png(d / "reconstructions.png", (81, 11), 90 + idx)
    cfg = {"prior": {"name": prior}, "loss": {"name": loss, "lambda": lam}, "seed": seed,
           "generator": {"preset": generator, "steps": GEN_STEPS[generator], "batch_size": 128, "train_images": 20000}}
    label = f"{prior}/{loss}(λ={lam:g})/s{seed}"
    return {"label": label, "keys": keys, "nodes": nodes}, cfg


def _sweep(tmp: Path, name: str, specs: list[tuple]) -> Path:
    """Run records -> aggregate -> export, the same path real results take into results/<name>."""
    root = tmp / f"runs-{name}"
    sweep = root / "sweeps" / name
    made = [_cell(root, i, *spec[:4], **spec[4] if len(spec) > 4 else {}) for i, spec in enumerate(specs)]
    write_json(sweep / "cells.json", [c for c, _ in made])
    write_text(sweep / "cell_configs.yaml", yaml.safe_dump_all([cfg for _, cfg in made], sort_keys=False))
    write_text(sweep / "config.yaml", "seed: 0\n")
    aggregate.write_tables(sweep, root)
    return export.export(sweep, tmp / "results" / name, run_root=root)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figs")
    specs = [(p, "dm", lam, s) for p in ("gaussian", "gmm", "dinov2") for lam in (1.0, 10.0) for s in (0, 1)]
    specs += [("gaussian", "kl", 1e-3, s) for s in (0, 1)]
    specs += [("gaussian", "dm", 1.0, s, {"generator": "cpu-small"}) for s in (0, 1)]
    specs += [("text", "dm", 10.0, 0, {"fail": True})]
    _sweep(tmp, "synth", specs)
    shutil.copytree(REPO / "results" / "paper", tmp / "results" / "paper",
                    ignore=shutil.ignore_patterns("figures"))
    out = tmp / "out"
    figures.main(["--results", str(tmp / "results"), "--out", str(out)])
    return tmp / "results", out


def test_every_figure_is_a_png_and_a_pdf(rendered):
    results, out = rendered
    pngs = sorted(out.rglob("*.png"))
    names = {p.relative_to(out).as_posix() for p in pngs}
    for stem in ["tradeoff", "gfid_vs_lambda", "gfid_vs_epochs", "ranking", "convergence", "samples_gaussian",
                 "samples_gmm", "samples_dinov2", "samples_text"]:
        assert f"synth/figures/{stem}.png" in names, stem
    assert {f"paper/figures/paper_table{i}.png" for i in ("1_tradeoff", "2_lambda", "3_epochs")} <= names
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            w, h = im.size
        assert 300 <= w <= 4000 and 150 <= h <= 6000, (p, im.size)
        pdf = p.with_suffix(".pdf")
        assert pdf.exists() and pdf.read_bytes()[:5] == b"%PDF-", pdf
    # The samples figure has one row per cell: 8 gaussian cells against 1 text cell.
    with Image.open(out / "synth/figures/samples_gaussian.png") as a, Image.open(out / "synth/figures/samples_text.png") as b:
        assert a.size[1] > 4 * b.size[1]
    # --out leaves the exported folder untouched.
    assert not list(results.rglob("figures")) and not list(results.rglob("report.html"))


def test_small_sweep_skips_figures_and_correlation(tmp_path):
    """Two cells, one lambda each, one schedule: no lambda/epochs figure, no rho, and the reasons."""
    sweep = _sweep(tmp_path, "pair", [("gaussian", "dm", 1.0, 0), ("gaussian", "kl", 1e-3, 0),
                                      ("gmm", "dm", 1.0, 0, {"generator": "cpu-small", "fail": True})])
    wide = figures.load_sweep(sweep)
    assert wide["epochs"].tolist() == [5.12, 5.12, 20.48] and wide["cell_id"].notna().all()
    with pytest.raises(figures.Skip, match="two or more lambdas"):
        figures.lambda_figure(wide, "pair")
    with pytest.raises(figures.Skip, match=r"same number of epochs \(5.12"):
        figures.epochs_figure(wide, "pair")
    table, corr = figures.ranking(wide, figures.read_paper_table(REPO / "results", figures.PAPER_TABLE1))
    assert table["paper_reference"].tolist() == ["Gaussian", "VAE baseline", "GMM"]
    assert table["note"].iloc[2].startswith("no finished cell (failed: tokenizer: NonFiniteLossError")
    assert corr["n_shared"].tolist() == [2] and math.isnan(corr["spearman_rho"][0])
    md = figures.ranking_markdown(table, corr)
    assert "undefined: 2 prior(s) shared" in md and "rho =" not in md
    assert "## fashion_mnist / cpu-tiny / cpu-small" in md and "no finished cell in this setting" in md


def test_ranking_against_paper_table1(rendered):
    _, out = rendered
    rank = pd.read_csv(out / "synth/figures/ranking.csv")
    assert list(rank.columns) == figures.RANKING_COLS
    tiny = rank[rank["generator"] == "cpu-tiny"].set_index(["prior", "loss"])
    assert tiny.loc[("dinov2", "dm"), "rank"] == 1 and tiny.loc[("dinov2", "dm"), "paper_reference"] == "DINO"
    assert tiny.loc[("gaussian", "kl"), "paper_reference"] == "VAE baseline"
    assert tiny.loc[("gaussian", "dm"), "lambda"] == 1.0  # best lambda per (prior, loss)
    assert tiny.loc[("gaussian", "dm"), "gfid"] == pytest.approx(60.25) and tiny.loc[("gaussian", "dm"), "n_seeds"] == 2
    assert math.isnan(tiny.loc[("text", "dm"), "rank"]) and tiny.loc[("text", "dm"), "n_seeds"] == 0  # failed cell
    assert (tiny["rank_shared"].dropna().tolist() == tiny["paper_rank_shared"].dropna().tolist())
    rho = pd.read_csv(out / "synth/figures/ranking_spearman.csv").set_index("generator")
    assert rho.loc["cpu-tiny", "n_shared"] == 4 and rho.loc["cpu-tiny", "spearman_rho"] == pytest.approx(1.0)
    assert math.isnan(rho.loc["cpu-small", "spearman_rho"]) and rho.loc["cpu-small", "note"].startswith("undefined")
    assert "Spearman's rho = 1.000" in (out / "synth/figures/ranking.md").read_text()


def test_html_report_stands_alone_and_links_resolve(rendered):
    results, out = rendered
    page = out / "synth" / "report.html"
    text = page.read_text()
    n_figs = len(pd.read_json(out / "synth/figures/manifest.json", typ="series")["figures"])
    assert text.count("data:image/png;base64,") == n_figs + 3  # + the paper's three
    assert "<table>" in text and "Mean ± std over seeds" in text and "Ranking of the priors" in text
    # The synthetic sweep has no training curves: those two figures (only) say why they are absent.
    skipped = re.findall(r"<b>([^<]+)</b> not drawn", text)
    assert "NonFiniteLossError" in text and len(skipped) == 2 and all("training" in s or "teachers" in s for s in skipped), skipped
    hrefs = re.findall(r'href="([^"]+)"', text)
    assert any(h.endswith("/tokenizer.log") for h in hrefs) and any(h.endswith("/config.yaml") for h in hrefs)
    assert any(h.endswith("tokenizer.failed.json") for h in hrefs)
    for h in hrefs:
        assert not h.startswith(("/", "http")), h
        assert (page.parent / h).resolve().is_file(), h
    assert "gfid_vs_lambda" in text and "samples_text" in text
    # benchmark.report alone rebuilds the same page from the figures already drawn.
    report.main(["--results", str(results), "--out", str(out)])
    assert page.read_text() == text


def test_paper_tables_and_mapping():
    t2 = figures.read_paper_table(REPO / "results", figures.PAPER_TABLE2)
    assert "t range annealed [0,1]->[0,0.5]" in set(t2["setting"]) and t2["gfid_5k"].dtype.kind == "f"
    t1 = figures.read_paper_table(REPO / "results", figures.PAPER_TABLE1)
    assert set(figures.PAPER_ROW_OF_PRIOR.values()) | {figures.BASELINE_ROW} == set(t1["reference"])
    assert figures.paper_reference("gmm", "kl") == "VAE baseline"
    assert figures.paper_reference("mobilenet_v2-sup", "dm") == "ResNet" and figures.paper_reference("gaussian", "mmd") is None


def test_committed_results_regenerate(tmp_path):
    results = REPO / "results"
    if not (results / "embedded-default" / "results.csv").exists():
        pytest.skip("results/embedded-default is not exported yet "
                    "(python -m benchmark.export runs/sweeps/<default sweep> results/embedded-default)")
    outs = figures.run(results, tmp_path)
    assert {tmp_path / "embedded-default", tmp_path / "mini-paper"} <= set(outs)
    for d in outs:
        assert (d / "report.html").exists() and (d / "figures" / "tradeoff.png").exists()
        assert (d / "figures" / "ranking.csv").exists()


def test_cli_is_frozen():
    """The options users and scripts call; renaming one is an API change."""
    opts = {o for a in figures.parser()._actions for o in a.option_strings}
    assert opts == {"-h", "--help", "--results", "--out", "--sweep", "--no-report"}
    with pytest.raises(SystemExit, match="does not exist; export a sweep first"):
        figures.main(["--results", "/nonexistent/results"])
