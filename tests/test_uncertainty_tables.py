"""Uncertainty in the results tables and figures, on hand-built results frames with known seed values.

Every expected number is worked out by hand in the comments (closed forms of the t distribution
with 1 and 2 degrees of freedom), so none of them is produced by the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmark import aggregate, figures, report
from benchmark.store import write_json, write_text

# t(0.975) quantiles in closed form: df = 1 is Cauchy, tan(pi (p - 1/2)); df = 2 has
# F^-1(p) = (2p - 1) / sqrt(2 p (1 - p)).
T1 = math.tan(0.475 * math.pi)                      # 12.7062...
T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)            # 4.30265...


def welch_p_df2(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom: 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def _wide(cells: list[tuple], dataset: str = "fashion_mnist") -> pd.DataFrame:
    """(prior, loss, lambda, seed, {metric: value}) -> a results.csv-like frame of finished cells."""
    rows = [{"dataset": dataset, "prior": p, "loss": l, "lambda": lam, "tokenizer": "cpu-tiny",
             "generator": "cpu-tiny", "seed": s, "status": "done", **m} for p, l, lam, s, m in cells]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- over seeds: the t-interval

def test_over_seeds_t_interval_by_hand():
    wide = _wide([("a", "dm", 1.0, 0, {"gfid": 10.0, "fd_domain": 5.0}), ("a", "dm", 1.0, 1, {"gfid": 12.0, "fd_domain": 7.0}),
                  ("b", "dm", 1.0, 0, {"gfid": 10.0, "fd_domain": 4.0}), ("b", "dm", 1.0, 1, {"gfid": 11.0}),
                  ("b", "dm", 1.0, 2, {"gfid": 12.0, "fd_domain": 6.0}),
                  ("c", "dm", 1.0, 0, {"gfid": 30.0, "fd_domain": 9.0})])
    s = aggregate.over_seeds(wide, metrics=["gfid", "fd_domain"]).set_index("prior")
    # a: mean 11, s = sqrt(2); half-width t1 * sqrt(2) / sqrt(2) = t1.
    assert s.loc["a", "gfid"] == 11.0 and s.loc["a", "gfid_std"] == pytest.approx(math.sqrt(2))
    assert s.loc["a", "gfid_ci95"] == pytest.approx(T1, rel=1e-12) and T1 == pytest.approx(12.7062047, abs=1e-6)
    # b: 10, 11, 12 -> s = 1, half-width t2 / sqrt(3) = 2.48414...
    assert s.loc["b", "gfid_std"] == pytest.approx(1.0) and s.loc["b", "gfid_ci95"] == pytest.approx(T2 / math.sqrt(3))
    assert s.loc["b", "gfid_ci95"] == pytest.approx(2.484138, abs=1e-6)
    # b's fd_domain has 2 of the 3 seeds: the interval uses n = 2 (4, 6 -> s = sqrt 2, half-width t1).
    assert s.loc["b", "n_seeds"] == 3 and s.loc["b", "fd_domain_n"] == 2
    assert s.loc["b", "fd_domain_ci95"] == pytest.approx(T1)
    # c: one seed -> no std, no interval.
    assert s.loc["c", "gfid"] == 30.0 and math.isnan(s.loc["c", "gfid_std"]) and math.isnan(s.loc["c", "gfid_ci95"])
    md = aggregate.seeds_markdown(s.reset_index())
    assert "| 11 ± 1.4 [±13] |" in md            # 12.706 to 2 significant digits
    assert "| 11 ± 1 [±2.5] | 5 ± 1.4 [±13] (n=2) |" in md
    assert "| 30 | 9 |" in md                     # the value alone with one seed
    assert aggregate.t_halfwidth(3.0, 1) != aggregate.t_halfwidth(3.0, 1)  # NaN below two values


def test_results_csv_and_markdown_carry_the_interval(tmp_path):
    """write_tables: results_over_seeds.csv has _std/_n/_ci95 columns and results.md explains them."""
    root, sweep = tmp_path / "runs", tmp_path / "runs" / "sweeps" / "s"
    cells = []
    for seed, (gfid, fd) in enumerate([(50.0, 20.0), (54.0, 22.0)]):
        nodes = {}
        for stage, facts in (("recon_eval", {"rfid": 10.0, "psnr": 20.0}),
                             ("gen_eval", {"gfid": gfid, "fd_domain": fd, "fd_domain_lo": fd - 1.5,
                                           "fd_domain_hi": fd + 2.25, "floor_fd_domain": 3.25, "floor_gfid": 12.5,
                                           "tokenizer_design": "conv-f4"})):
            key = f"{stage}-{seed}"
            nodes[stage] = key
            write_json(root / "stages" / stage / key / "record.json",
                       {"facts": facts, "wall_time_s": 1.0, "device_hours": 1 / 3600})
        cells.append({"label": f"g{seed}", "nodes": nodes,
                      "keys": {"dataset": "fashion_mnist", "prior": "gaussian", "loss": "dm", "lambda": 1.0,
                               "tokenizer": "cpu-tiny", "generator": "cpu-tiny", "seed": seed}})
    write_json(sweep / "cells.json", cells)
    aggregate.write_tables(sweep, root)
    csv = pd.read_csv(sweep / "results_over_seeds.csv")
    assert {"gfid_ci95", "gfid_n", "fd_domain_ci95", "tokenizer_design"} <= set(csv.columns)
    # 50, 54: s = 2 sqrt(2), half-width t1 * 2 sqrt(2) / sqrt(2) = 2 t1.
    assert csv["gfid_ci95"].iloc[0] == pytest.approx(2 * T1) and csv["tokenizer_design"].iloc[0] == "conv-f4"
    md = (sweep / "results.md").read_text()
    assert "| 20 [18.5, 22.25] |" in md and "| 22 [20.5, 24.25] |" in md   # primary metric's bootstrap bounds
    assert "| 52 ± 2.8 [±25] |" in md and "| 21 ± 1.4 [±13] |" in md      # 2 t1 = 25.4; t1 = 12.7
    assert md.count("real-vs-real floor (train vs test, same counts): fd_domain 3.25, gfid 12.5.") == 2
    assert "Student-t interval" in md and "bootstrap percentile interval" in md and "conv-f4" in md
    assert "The primary generation metric is `fd_domain`" in md


# ---------------------------------------------------------------- floors and the primary metric

def test_floors_line_per_dataset_and_missing():
    one = _wide([("a", "dm", 1.0, 0, {"gfid": 40.0, "floor_gfid": 12.5, "floor_fd_domain": 3.0,
                                      "floor_kid_domain": 0.001, "floor_precision_domain": 0.7})])
    # Order: the contract's floor metrics (fd_domain, kid, precision, recall, then gfid).
    assert aggregate.floors_line(one) == ("real-vs-real floor (train vs test, same counts): fd_domain 3, "
                                          "kid_domain 0.001, precision_domain 0.7, gfid 12.5.\n")
    two = pd.concat([one, _wide([("a", "dm", 1.0, 0, {"gfid": 50.0, "floor_gfid": 20.0})], dataset="mnist")])
    line = aggregate.floors_line(two)
    assert "floor, fashion_mnist (train vs test, same counts): fd_domain 3," in line
    assert "floor, mnist (train vs test, same counts): gfid 20." in line
    assert aggregate.floors_line(_wide([("a", "dm", 1.0, 0, {"gfid": 1.0})])).startswith(
        "real-vs-real floor: not recorded in this sweep")
    # As the evaluation writes them: Inception's floors after the domain ones, KID's subset std left
    # out, the sample counts (floor_n*) last and named as counts.
    full = _wide([("a", "dm", 1.0, 0, {"floor_n": 500, "floor_kid": 0.02, "floor_gfid": 36.0, "floor_n_domain": 1000,
                                       "floor_kid_std_domain": 0.001, "floor_fd_snap_domain": 4.5,
                                       "floor_fd_domain": 2.5})])
    assert aggregate.floors_line(full) == ("real-vs-real floor (train vs test, same counts): fd_domain 2.5, gfid 36, "
                                           "kid 0.02, fd_snap_domain 4.5; sample counts n 500, n_domain 1000.\n")


def test_primary_metric_falls_back_to_gfid():
    assert aggregate.primary_metric(_wide([("a", "dm", 1.0, 0, {"gfid": 1.0, "fd_domain": 2.0})])) == "fd_domain"
    assert aggregate.primary_metric(_wide([("a", "dm", 1.0, 0, {"gfid": 1.0, "fd_domain": None})])) == "gfid"
    assert aggregate.primary_metric(_wide([("a", "dm", 1.0, 0, {"gfid": 1.0})])) == "gfid"


# ---------------------------------------------------------------- Welch's test between neighbours

def test_welch_clear_unclear_and_one_seed():
    # [10, 12] vs [20, 22]: both variances 2, se = sqrt(2/2 + 2/2) = sqrt 2, t = 10 / sqrt 2, df = 2.
    p, verdict = figures.welch(np.array([10.0, 12.0]), np.array([20.0, 22.0]))
    assert p == pytest.approx(welch_p_df2(10 / math.sqrt(2))) and p == pytest.approx(0.019419, abs=1e-6)
    assert verdict == "distinct (p = 0.019)"
    # [10, 14] vs [11, 15]: variances 8, se = sqrt 8, t = 1 / sqrt 8, df = 2 -> p = 0.757.
    p, verdict = figures.welch(np.array([10.0, 14.0]), np.array([11.0, 15.0]))
    assert p == pytest.approx(welch_p_df2(1 / math.sqrt(8))) and verdict == "cannot tell (p = 0.76)"
    p, verdict = figures.welch(np.array([10.0]), np.array([20.0, 22.0]))
    assert math.isnan(p) and verdict == "cannot tell (1 seed)"
    assert figures.welch(np.array([1.0, 1.0]), np.array([2.0, 2.0]))[1] == "cannot tell (no spread over seeds)"


PAPER = pd.DataFrame({"reference": ["DINO", "Gaussian", "VAE baseline", "GMM"], "gfid_5k": [13.1, 26.6, 27.3, 29.6]})


def _ranked_sweep(gaussian: tuple[float, float] = (20.0, 22.0)) -> pd.DataFrame:
    """dinov2 [10, 12], gaussian/dm (given), gmm [24, 26], and the kl baseline with one seed (40)."""
    cells = []
    for prior, loss, vals in (("dinov2", "dm", (10.0, 12.0)), ("gaussian", "dm", gaussian),
                              ("gmm", "dm", (24.0, 26.0)), ("gaussian", "kl", (40.0,))):
        cells += [(prior, loss, 1.0, s, {"fd_domain": v, "gfid": 2 * v, "rfid": 1.0, "psnr": 20.0})
                  for s, v in enumerate(vals)]
    return _wide(cells)


def test_ranking_neighbours_and_spearman_by_hand():
    table, corr = figures.ranking(_ranked_sweep(), PAPER)
    assert table["metric"].unique().tolist() == ["fd_domain"]
    assert table["prior"].tolist() == ["dinov2", "gaussian", "gmm", "gaussian"] and table["rank"].tolist() == [1, 2, 3, 4]
    assert table["mean"].tolist() == [11.0, 21.0, 25.0, 40.0]
    assert table["ci95"].iloc[0] == pytest.approx(T1) and math.isnan(table["ci95"].iloc[3])
    # dinov2 vs gaussian: t = 10/sqrt 2 (p = 0.019); gaussian vs gmm: t = 4/sqrt 2 = 2 sqrt 2, df 2 -> p = 0.106.
    assert table["p_vs_next"].iloc[0] == pytest.approx(welch_p_df2(10 / math.sqrt(2)))
    assert table["p_vs_next"].iloc[1] == pytest.approx(welch_p_df2(2 * math.sqrt(2)))
    assert table["p_vs_next"].iloc[1] == pytest.approx(0.105573, abs=1e-6)
    assert table["vs_next"].iloc[:3].tolist() == ["distinct (p = 0.019)", "cannot tell (p = 0.11)", "cannot tell (1 seed)"]
    assert pd.isna(table["vs_next"].iloc[3])  # the last prior has no next one
    # Ours 1,2,3,4 (dinov2, gaussian, gmm, kl) against the paper's 1,2,4,3: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8;
    # spearmanr's p: t = 0.8 sqrt(2 / 0.36), df 2 -> 1 - t / sqrt(2 + t^2) = 0.2.
    c = corr.iloc[0]
    assert c["spearman_rho"] == pytest.approx(0.8) and c["p_value"] == pytest.approx(0.2)
    # No resample of the seeds changes the order (ranges 10-12, 20-22, 24-26, 40): the interval is the point.
    assert (c["rho_lo"], c["rho_hi"], c["n_boot"]) == (pytest.approx(0.8), pytest.approx(0.8), figures.N_BOOT)
    md = figures.ranking_markdown(table, corr, {"fashion_mnist": {"fd_domain": 3.0, "gfid": 12.5, "kid_domain": 0.1}})
    assert "Spearman's rho = 0.800 (p = 0.2, n = 4; 95% bootstrap interval over seeds [0.800, 0.800], B = 2000)" in md
    assert "real-vs-real floor (train vs test, same counts): fd_domain 3, gfid 12.5." in md
    assert "| 11 ± 1.4 [±13] |" in md and "Welch's t-test" in md and "| cannot tell (1 seed) |" in md


def test_spearman_bootstrap_interval_by_hand_and_seeded():
    # gaussian [20, 28] (mean 24) against gmm [24, 26] (mean 25): the point estimate keeps the order
    # above (rho 0.8). Resampled, gaussian's mean is 20/24/28 w.p. 1/4, 1/2, 1/4 and gmm's 24/25/26:
    # gaussian worse than gmm (28, p 1/4) gives ranks 1,3,2,4 against 1,2,4,3 -> rho = 1 - 6*6/60 = 0.4;
    # a tie (p 1/8) 0.632; else 0.8. The 2.5-97.5 percentiles are therefore 0.4 and 0.8.
    table, corr = figures.ranking(_ranked_sweep(gaussian=(20.0, 28.0)), PAPER)
    c = corr.iloc[0]
    assert c["spearman_rho"] == pytest.approx(0.8)
    assert c["rho_lo"] == pytest.approx(0.4) and c["rho_hi"] == pytest.approx(0.8)
    assert c["rho_lo"] <= c["spearman_rho"] <= c["rho_hi"]
    assert figures.ranking(_ranked_sweep(gaussian=(20.0, 28.0)), PAPER)[1].equals(corr)  # same seed, same numbers
    # 15 priors of 5 noisy seeds against a reference in blocks of three shuffled ranks (rho about 0.9):
    # the interval contains the estimate, repeats exactly, and moves with the seed.
    rng = np.random.default_rng(7)
    vals = [rng.normal(m, 8.0, size=5) for m in range(10, 40, 2)]
    ref = np.array([3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11, 15, 13, 14], dtype=float)
    lo, hi, n = figures.bootstrap_spearman(vals, ref, n_boot=500, seed=0)
    assert n == 500 and -1 <= lo <= hi <= 1
    assert (lo, hi, n) == figures.bootstrap_spearman(vals, ref, n_boot=500, seed=0)
    assert (lo, hi) != figures.bootstrap_spearman(vals, ref, n_boot=500, seed=1)[:2]
    point = figures.spearman_rows(np.array([[v.mean() for v in vals]]), ref)[0]
    assert lo <= point <= hi


def test_spearman_rows_is_scipy_spearmanr():
    from scipy.stats import spearmanr
    x = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    ref = np.array([1.0, 2.0, 4.0, 3.0])
    got = figures.spearman_rows(x, ref)
    assert got[:3] == pytest.approx([spearmanr(r, ref)[0] for r in x[:3]])
    assert got[0] == pytest.approx(0.8) and got[1] == pytest.approx(-0.8) and math.isnan(got[3])


# ---------------------------------------------------------------- convergence over EMA snapshots

def _snapshot_sweep() -> pd.DataFrame:
    """Three priors, two seeds; at 25% a and b are in the other order, from 50% on as at the end."""
    snaps = {"a": (50.0, 30.0, 15.0), "b": (40.0, 35.0, 25.0), "c": (60.0, 45.0, 35.0)}
    final = {"a": (10.0, 12.0), "b": (20.0, 22.0), "c": (30.0, 32.0)}
    cells = []
    for prior in "abc":
        for seed, fd in enumerate(final[prior]):
            m = {"fd_domain": fd, "gfid": fd * 3, "floor_fd_domain": 2.0}
            for pct, v in zip((25, 50, 75), snaps[prior]):
                m[f"snap{pct:03d}_fd_domain"] = v
                m[f"snap{pct:03d}_step"] = 8 * pct
            cells.append((prior, "dm", 1.0, seed, m))
    return _wide(cells)


def test_snapshot_agreement_by_hand():
    metric, long = figures.convergence_summary(_snapshot_sweep())
    assert metric == "fd_domain" and sorted(long["percent"].unique()) == [25, 50, 75, 100]
    a = long.set_index(["prior", "percent"])
    assert a.loc[("a", 100), "mean"] == 11.0 and a.loc[("a", 100), "ci95"] == pytest.approx(T1)
    assert a.loc[("a", 25), "mean"] == 50.0 and a.loc[("a", 25), "std"] == 0.0 and a.loc[("a", 25), "step"] == 200
    agree = figures.snapshot_agreement(long).set_index("percent")
    # 25%: ranks (2, 1, 3) against (1, 2, 3): sum d^2 = 2, rho = 1 - 6*2/(3*8) = 0.5; spearmanr's p with
    # n = 3: t = 0.5 / sqrt(0.75) = 1/sqrt 3, df 1 -> 1 - (2/pi) atan(1/sqrt 3) = 1 - 1/3.
    assert agree.loc[25, "spearman_rho"] == pytest.approx(0.5) and agree.loc[25, "p_value"] == pytest.approx(2 / 3)
    assert agree["same_order"].tolist() == [False, True, True] and agree.loc[50, "spearman_rho"] == pytest.approx(1.0)
    assert figures.stability_sentence(agree.reset_index()) == (
        "The order settles by 50%: from there on every snapshot orders the priors as the final model does; "
        "at 25% it differs.")
    stable = agree.reset_index().assign(same_order=True)
    assert figures.stability_sentence(stable).startswith("Stable: every snapshot (25%, 50%, 75%)")
    assert figures.stability_sentence(stable.assign(same_order=[True, True, False])) == (
        "Not stable: the order of the priors still differs from the final one at 75%.")


def test_snapshot_separation_by_hand():
    """Seed noise beside the spread at each snapshot: the snapshots' seeds agree (half-width 0), the
    final values differ by 2 between seeds (half-width t(0.975, 1) = 12.7 > a quarter of the range 20)."""
    _, long = figures.convergence_summary(_snapshot_sweep())
    sep = figures.snapshot_separation(long).set_index("percent")
    assert sep["range"].tolist() == [20.0, 15.0, 20.0, 20.0]  # 60-40, 45-30, 35-15, 31-11
    assert sep.loc[25, "max_ci95"] == 0.0 and sep.loc[25, "n_within"] == 3 and sep.loc[25, "n_with_interval"] == 3
    assert sep.loc[100, "max_ci95"] == pytest.approx(T1) and sep.loc[100, "n_within"] == 0
    assert figures.separation_sentence(sep.reset_index()) == (
        "Seed noise is small beside the spread (every prior's 95% half-width at most 0.25 of the range of the "
        "means) at 25%, 50%, 75%.")
    # One prior's final seeds 10 and 12 -> 10 and 10.5 (std 0.354, half-width 3.18 <= 20/4): still two above.
    wide = _snapshot_sweep()
    wide.loc[(wide["prior"] == "a") & (wide["seed"] == 1), "fd_domain"] = 10.5
    sep = figures.snapshot_separation(figures.convergence_summary(wide)[1]).set_index("percent")
    assert sep.loc[100, "n_within"] == 1 and sep.loc[100, "widest"] in ("b/dm", "c/dm")
    assert "at 100%" not in figures.separation_sentence(sep.reset_index())
    # One seed: no interval, so nothing is claimed.
    one = figures.snapshot_separation(figures.convergence_summary(_snapshot_sweep().query("seed == 0"))[1])
    assert (one["n_with_interval"] == 0).all()
    assert figures.separation_sentence(one) == "Seed noise against the spread needs two seeds per prior: not measured."


def test_convergence_prefers_snap100_at_the_snapshot_count():
    """The final EMA scored like the snapshots (snap100_*, same sample count) is the 100% point."""
    wide = _snapshot_sweep().assign(snap100_fd_domain=lambda d: d["fd_domain"] + 4.0, floor_fd_snap_domain=5.0)
    _, long = figures.convergence_summary(wide)
    final = long[long["percent"] == 100].set_index("prior")
    assert final.loc["a", "mean"] == 15.0 and set(final["column"]) == {"snap100_fd_domain"}
    fig, caption, md = figures.convergence(wide.assign(snapshot_n_samples=250), "t")
    assert "`snap100_fd_domain`, the final EMA scored like the snapshots" in md
    assert "real-vs-real floor (train vs test, same counts): fd_domain 2, fd_snap_domain 5." in md
    assert "Snapshots scored on 250 generated samples each." in caption
    # Without snap100 the 100% point is fd_domain itself.
    _, long = figures.convergence_summary(_snapshot_sweep())
    assert set(long.loc[long["percent"] == 100, "column"]) == {"fd_domain"}


def _export(tmp_path, wide: pd.DataFrame, name: str = "snap"):
    """The two files render_sweep reads from an exported sweep: results.csv and cells.json."""
    sweep = tmp_path / "results" / name
    write_text(sweep / "results.csv", wide.to_csv(index=False))
    write_json(sweep / "cells.json", [{"keys": {k: r[k] for k in aggregate.KEY_COLS}, "cell_id": f"c{i}",
                                       "label": f"{r['prior']}/s{r['seed']}"} for i, r in wide.iterrows()])
    return sweep


def test_convergence_files_written_and_removed(tmp_path):
    wide = _snapshot_sweep()
    sweep = _export(tmp_path, wide)
    out = tmp_path / "out" / "snap"
    man = figures.render_sweep(sweep, out / "figures", tmp_path / "results")
    drawn = {f["name"]: f for f in man["figures"]}
    assert {"convergence", "ranking", "tradeoff"} <= set(drawn)
    for stem in ("convergence", "ranking"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 5000
        assert (out / "figures" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "settles by 50%" in drawn["convergence"]["caption"] and "convergence.md" in man["tables"]
    md = (out / "figures" / "convergence.md").read_text()
    assert "| a | dm | 1 | 2 | 50 ± 0 [±0] (#2) | 30 ± 0 [±0] (#1) | 15 ± 0 [±0] (#1) | 11 ± 1.4 [±13] (#1) |" in md
    assert "| 25% | 200 | 3 | 0.500 | 0.6667 | no |" in md and "real-vs-real floor (train vs test, same counts): fd_domain 2." in md
    assert "| 100% | – | 20 | 12.7 (a/dm) | 0.6353 | 0 of 3 |" in md and "| 25% | 200 | 20 | 0 (a/dm) | 0 | 3 of 3 |" in md
    page = report.write_report(sweep, out, None).read_text()
    assert "Convergence: FD_domain against generator training" in page and "id='convergence'" in page
    # The same sweep without snapshot columns: the convergence outputs go, and the manifest says why.
    plain = wide[[c for c in wide.columns if not c.startswith("snap")]]
    _export(tmp_path, plain)
    man = figures.render_sweep(sweep, out / "figures", tmp_path / "results")
    assert not (out / "figures" / "convergence.md").exists() and not (out / "figures" / "convergence.png").exists()
    skipped = {s["name"]: s["reason"] for s in man["skipped"]}
    # (the synthetic sweep has no training curves either)
    assert set(skipped) == {"gfid_vs_lambda", "gfid_vs_epochs", "convergence", "latent_curves", "teacher_curves"}
    assert "snapNNN_fd_domain" in skipped["convergence"]
