"""Training-curve figures (latent statistics over tokenizer training, dm teachers' held-out loss)
from a synthetic sweep folder laid out as runs/sweeps/<sweep> beside runs/stages/<stage>/<key>/."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from benchmark import aggregate, figures, report
from benchmark.store import read_json, write_json

EVERY, WARMUP, MATCH, FINETUNE = 20, 100, 200, 100  # tokenizer iterations; stats every 20


def flat_swd(it: int) -> float:
    """Falls fast once matching starts, then stays at 0.2: settled long before the match phase ends."""
    return 1.0 if it <= WARMUP else 0.2 + 0.8 * math.exp(-(it - WARMUP) / 10)


def falling_swd(it: int) -> float:
    """Falls linearly from 1.0 to 0.2 over the whole match phase: still falling at its end."""
    return 1.0 - 0.8 * min(max(it - WARMUP, 0), MATCH) / MATCH


def latent_curve(swd, std_end: float) -> list[dict]:
    """Points as the tokenizer stage writes them: one at 0, then every EVERY iterations, each
    labelled with the phase of the iteration before it."""
    out = []
    for it in range(0, WARMUP + MATCH + FINETUNE + 1, EVERY):
        last = max(it - 1, 0)
        phase = "warmup" if last < WARMUP else ("match" if last < WARMUP + MATCH else "finetune")
        std = 3.0 if it <= WARMUP else std_end
        out.append({"iter": it, "phase": phase, "latent_std": std, "latent_mean": 0.01, "swd_to_prior": swd(it)})
    return out


def make_sweep(tmp: Path, specs: list[tuple], curves: bool = True) -> Path:
    """specs: (prior, loss, lambda, seed, generator, swd curve or None). Cells of the same prior,
    loss, lambda and seed share their tokenizer and teacher runs, as the DAG shares them when only
    the generator differs. Returns the sweep folder (results.csv written by aggregate)."""
    root = tmp / "runs"
    cells = []
    for i, (prior, loss, lam, seed, generator, swd) in enumerate(specs):
        keys = {"dataset": "fashion_mnist", "prior": prior, "loss": loss, "lambda": lam, "tokenizer": "cpu-tiny",
                "generator": generator, "seed": seed}
        shared = f"{prior}-{loss}-{lam:g}-s{seed}"
        nodes = {"tokenizer": f"tok-{shared}", "recon_eval": f"rec-{shared}", "gen_eval": f"gen-{i}"}
        if loss == "dm":
            nodes["teacher"] = f"teach-{prior}-s{seed}"
        facts = {"recon_eval": {"rfid": 10.0 + i, "psnr": 20.0}, "gen_eval": {"gfid": 40.0 + i}}
        for stage, key in nodes.items():
            d = root / "stages" / stage / key
            write_json(d / "record.json", {"facts": facts.get(stage, {}), "wall_time_s": 1.0, "device_hours": 0.0})
            if not curves:
                continue
            if stage == "tokenizer" and swd is not None:
                write_json(d / figures.LATENT_CURVE, latent_curve(swd, 1.0 if swd is flat_swd else 1.5))
            if stage == "teacher":
                # Held-out loss every 100 steps, flattening at 0.5 by step 1000 (the stage stops there).
                write_json(d / figures.TEACHER_CURVE,
                           {"step_heldout_fm": [[s, 0.5 + 2.0 / s * 100] for s in range(100, 1001, 100)]})
                write_json(d / "record.json", {"facts": {"teacher_steps_run": 1000, "teacher_stopped": "plateau"},
                                               "wall_time_s": 1.0, "device_hours": 0.0})
        cells.append({"label": shared, "keys": keys, "nodes": nodes})
    sweep = root / "sweeps" / "curves-0123"
    write_json(sweep / "cells.json", cells)
    aggregate.write_tables(sweep, root)
    return sweep


SPECS = [("gaussian", "dm", 1.0, 0, "cpu-tiny", flat_swd),
         ("gaussian", "dm", 1.0, 0, "cpu-small", flat_swd),  # same tokenizer and teacher runs as the cell above
         ("gaussian", "dm", 1.0, 1, "cpu-tiny", flat_swd),
         ("gmm", "dm", 1.0, 0, "cpu-tiny", falling_swd),
         ("gaussian", "kl", 0.001, 0, "cpu-tiny", flat_swd),
         ("gaussian", "kl", 0.001, 1, "cpu-tiny", falling_swd),
         ("gaussian", "mmd", 1.0, 0, "cpu-tiny", None)]  # stats_every = 0: no curve


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("curves"), SPECS)


def test_phase_boundaries_and_settling_rule(sweep):
    curves = figures.load_latent_curves(sweep)
    # Distinct tokenizer runs only: the cpu-small cell shares its run, the mmd cell has no curve.
    assert curves["run"].nunique() == 5
    run = curves[curves["run"] == "tok-gmm-dm-1-s0"]
    assert figures.phase_boundaries(run) == [(100.0, "match"), (300.0, "finetune")]
    flat = figures.match_end(curves[curves["run"] == "tok-gaussian-dm-1-s0"])
    assert flat["settled"] is True and flat["rel_change"] < 1e-3
    assert flat["swd_end"] == pytest.approx(0.2, abs=1e-6) and flat["std_end"] == 1.0
    falling = figures.match_end(run)
    # SWD(250) = 0.4 on the line, SWD(300) = 0.2: a 50% change over the last quarter.
    assert falling["settled"] is False and falling["rel_change"] == pytest.approx(0.5)
    assert falling["std_end"] == 1.5
    # A run stopped inside the warm-up has nothing to judge.
    assert figures.match_end(run[run["phase"] == "warmup"])["settled"] is None


def test_latent_curves_markdown_says_which_settled(sweep):
    _, caption, md = figures.latent_curves(sweep, "curves")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:4]): line
            for line in md.splitlines() if line.startswith("| gaussian") or line.startswith("| gmm")}
    assert set(rows) == {("gaussian", "dm", "1", "2"), ("gmm", "dm", "1", "1"), ("gaussian", "kl", "0.001", "2")}
    assert rows["gaussian", "dm", "1", "2"].rstrip(" |").endswith("| yes")
    assert "| 50.0% | no" in rows["gmm", "dm", "1", "1"]
    assert rows["gaussian", "kl", "0.001", "2"].rstrip(" |").endswith("| 1/2 seeds")  # one flat seed, one falling
    assert "less than 10%" in md and "last 25% of the match phase" in md  # the rule is stated
    assert "1 of 3 prior/loss/λ settled" in caption


def test_teacher_markdown_one_line_per_teacher_run(sweep):
    _, _, md = figures.teacher_curves(sweep, "curves")
    lines = [line for line in md.splitlines() if line.startswith("- ")]
    # gaussian s0 (shared by two cells), gaussian s1 and gmm s0; kl and mmd cells have no teacher.
    assert [line.split(" (")[0] for line in lines] == ["- gaussian s0", "- gaussian s1", "- gmm s0"]
    assert all("1000 steps run, stopped: plateau; final held-out FM loss 0.7 at step 1000" in line for line in lines)


def test_render_sweep_draws_then_removes_stale_curves(tmp_path):
    sweep = make_sweep(tmp_path, SPECS[:4])
    out = tmp_path / "figures"  # where write_report(sweep, tmp_path) looks
    man = figures.render_sweep(sweep, out, tmp_path / "no-paper")
    drawn = {f["name"]: f for f in man["figures"]}
    for stem in ("latent_curves", "teacher_curves"):
        assert drawn[stem]["files"] == [f"{stem}.png", f"{stem}.pdf"] and f"{stem}.md" in man["tables"]
        with Image.open(out / f"{stem}.png") as im:
            assert im.size[0] > 500 and im.size[1] > 200
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert "## fashion_mnist / cpu-tiny" in (out / "latent_curves.md").read_text()
    assert read_json(out / "manifest.json") == man
    page = report.write_report(sweep, tmp_path).read_text()
    assert "<h2>Latent statistics over tokenizer training</h2>" in page and "<td>yes</td>" in page
    # Three teacher runs: gaussian s0 (shared by two cells), gaussian s1, gmm s0.
    assert "<h2>Teachers: held-out flow-matching loss</h2>" in page and page.count("1000 steps run") == 3

    # The same sweep without any curve file (stats_every = 0, no plateau teacher): both skipped,
    # with the reason in the manifest, and the files of the earlier drawing gone.
    for f in [*sweep.parent.parent.glob("stages/*/*/*_curve.json")]:
        f.unlink()
    man = figures.render_sweep(sweep, out, tmp_path / "no-paper")
    skipped = {s["name"]: s["reason"] for s in man["skipped"]}
    assert "stats_every > 0" in skipped["latent_curves"] and "teacher_plateau" in skipped["teacher_curves"]
    assert not {"latent_curves", "teacher_curves"} & {f["name"] for f in man["figures"]}
    assert not list(out.glob("latent_curves.*")) and not list(out.glob("teacher_curves.*"))
    assert not {"latent_curves.md", "teacher_curves.md"} & set(man["tables"])
