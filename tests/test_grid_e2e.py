"""The whole grid at tiny sizes: every stage, tables and plot, skip on rerun, resume after
kill -9 with identical results, and a failing stage that does not stop the grid."""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark import grid
from _launch import clean_env

ROOT = Path(__file__).resolve().parent.parent


def _sweep_dir(run_root: Path) -> Path:
    (d,) = list((run_root / "sweeps").iterdir())
    return d


@pytest.mark.slow
def test_default_grid_end_to_end_and_rerun_skips(tiny_overrides, tmp_path, caplog):
    assert grid.main(tiny_overrides) == 0
    sweep = _sweep_dir(tmp_path / "runs")
    df = pd.read_csv(sweep / "results.csv")
    assert set(df["loss"]) == {"dm", "kl"}
    # The default's three cells (the MobileNetV2 cell is the mini-paper's; its ImageNet weights
    # load in tests/test_backbones.py and tests/test_reference_ddp.py).
    assert set(df["prior"]) == {"gaussian", "offline-mae"} and len(df) == 3
    feat = df.set_index("prior")["backbone_weights"]
    assert feat["offline-mae"].startswith("offline-mae:ssl_backbone-")
    assert df.set_index("prior").loc["offline-mae", "dm_teacher"] == "trained"
    for col in ("rfid", "psnr", "ssim", "gfid", "kid", "precision", "recall", "fd_mobilenet_v2",
                "rfd_mobilenet_v2"):
        assert df[col].map(lambda v: math.isfinite(float(v))).all(), col
    assert (df["status"] == "done").all()
    assert (df["n_samples"] == 20).all() and df["detector"].str.contains("inception").all()
    assert df["ref_features_sha256"].nunique() == 1 and (df["n_ref"] == 20).all()
    assert df["is"].isna().all()  # the offline Inception has no logits: IS unavailable, not 0
    assert (sweep / "tradeoff.png").stat().st_size > 1000
    assert (sweep / "results.md").read_text().count("| gaussian |") == 4  # per cell + over seeds
    long = pd.read_csv(sweep / "results_long.csv")
    assert {"metric", "value"} <= set(long.columns)
    stages = tmp_path / "runs" / "stages"
    for d in stages.glob("*/*"):
        assert (d / "record.json").exists() and (d / "config.yaml").exists()
        assert not list(d.glob("*.tmp-*")) and not (d / "ckpt.pt").exists()
    # A rerun skips every finished stage.
    # (How fast a rerun is belongs to benchmark.perf and the README, not to a timed assertion.)
    records = {p: p.stat().st_mtime_ns for p in stages.glob("*/*/record.json")}
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert grid.main(tiny_overrides) == 0
    assert "0 to run" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in stages.glob("*/*/record.json")} == records
    _check_sweep_cost(sweep, stages, tmp_path / "perf")


def _check_sweep_cost(sweep: Path, stages: Path, out: Path) -> None:
    """`benchmark.perf --sweep` on the finished sweep: its sums are the records', its replay of
    the launcher on one worker is that sum and on many the longest chain; an unfinished sweep is
    refused with a pointer to benchmark.status."""
    from benchmark import perf
    perf.main(["--sweep", str(sweep), "--out", str(out), "--workers", "1", "2", "64"])
    rep = json.loads((out / f"sweep_{sweep.name}.json").read_text())
    walls = [json.loads(p.read_text())["wall_time_s"] for p in stages.glob("*/*/record.json")]
    assert rep["stages"] == len(walls) and rep["work_s"] == pytest.approx(sum(walls))
    assert rep["replay_s"]["1"] == pytest.approx(sum(walls))
    assert rep["replay_s"]["64"] == pytest.approx(rep["longest_chain_s"])
    assert rep["longest_chain_s"] <= rep["replay_s"]["2"] <= rep["replay_s"]["1"]
    assert 0 < rep["span_s"] and sum(rep["by_stage"][s]["stages"] for s in rep["by_stage"]) == len(walls)
    v = rep["verdict"]  # grid=default states 15 minutes on 2 workers
    assert v["budget_s"] == 900 and v["workers"] == 2 and v["meets"] == (v["judged_s"] <= 900)
    assert "Budget (2 workers" in (out / f"sweep_{sweep.name}.md").read_text()
    rec = next(stages.glob("generator/*/record.json"))
    rec.rename(rec.with_suffix(".moved"))
    try:
        with pytest.raises(SystemExit) as exc:
            perf.main(["--sweep", str(sweep), "--out", str(out)])
        assert exc.value.code == 2
    finally:
        rec.with_suffix(".moved").rename(rec)


def _run(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "benchmark.grid", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_tokenizer(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + [
        "grid=single", "tokenizer.match_iters=60", "tokenizer.checkpoint_every=10"]
    env = clean_env()  # one thread, no launcher variables (tests/_launch.py)
    ref = _run(over + [f"run_root={tmp_path / 'a'}"], env)
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-3000:]
    # Interrupt the second run as soon as the tokenizer has written a checkpoint.
    proc = _run(over + [f"run_root={tmp_path / 'b'}"], env)
    # A condition wait: the limit only guards against a hang, it is not a speed requirement.
    deadline = time.time() + 1800
    while not list((tmp_path / "b").glob("stages/tokenizer/*/ckpt.pt")):
        assert proc.poll() is None, "the run ended before the tokenizer checkpointed"
        assert time.time() < deadline, "tokenizer never checkpointed (hang guard)"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tok_dir,) = list((tmp_path / "b").glob("stages/tokenizer/*"))
    assert not (tok_dir / "record.json").exists()
    again = _run(over + [f"run_root={tmp_path / 'b'}"], env)
    out = again.communicate(timeout=600)[0].decode()
    assert again.returncode == 0, out[-3000:]
    assert "resuming from" in out
    a = torch.load(next((tmp_path / "a").glob("stages/tokenizer/*/tokenizer.pt")), weights_only=True)
    b = torch.load(tok_dir / "tokenizer.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra = pd.read_csv(next((tmp_path / "a").glob("sweeps/*/results.csv")))
    rb = pd.read_csv(next((tmp_path / "b").glob("sweeps/*/results.csv")))
    assert ra["psnr"].tolist() == rb["psnr"].tolist()


@pytest.mark.slow
def test_failing_stage_is_recorded_and_grid_goes_on(tiny_overrides, tmp_path):
    cells = 'grid.cells=[["loss=dm","tokenizer.l1_weight=nan"],["loss=kl"]]'
    assert grid.main(tiny_overrides + [cells]) == 1
    df = pd.read_csv(_sweep_dir(tmp_path / "runs") / "results.csv").set_index("loss")
    assert df.loc["dm", "status"] == "failed"
    assert "tokenizer" in df.loc["dm", "failure"] and "step 0" in df.loc["dm", "failure"]
    assert df.loc["kl", "status"] == "done" and math.isfinite(df.loc["kl", "gfid"])


def test_bad_config_rejected_before_work(tmp_path, caplog):
    assert grid.main([f"run_root={tmp_path}", "prior.name=nope"]) == 2
    assert "gaussian" in caplog.text
    assert not (tmp_path / "stages").exists()


@pytest.mark.slow
def test_trained_teacher_cell_runs_every_stage(tiny_overrides, tmp_path):
    """A gmm cell with a trained teacher: reference -> teacher -> ... -> gen_eval."""
    npz = tmp_path / "ref_stats.npz"  # an ADM-style statistics file (mu, sigma)
    rng = np.random.default_rng(0)
    np.savez(npz, mu=rng.normal(size=2048), sigma=np.eye(2048))
    over = tiny_overrides + ["grid=single", "prior=gmm", "loss.teacher=trained",
                             "loss.teacher_steps=6", "loss.teacher_batch_size=16",
                             "++eval.labels=random", "eval.sampler.cfg_scale=2.0",
                             "++eval.sampler.cfg_interval=[0.3,1.0]", f"++eval.ref_npz={npz}"]
    assert grid.main(over) == 0
    runs = tmp_path / "runs"
    (teacher,) = list(runs.glob("stages/teacher/*"))
    assert (teacher / "teacher.pt").exists()
    df = pd.read_csv(_sweep_dir(runs) / "results.csv")
    assert df.loc[0, "dm_teacher"] == "trained" and math.isfinite(df.loc[0, "gfid"])
    (ge,) = list(runs.glob("stages/gen_eval/*"))
    facts = json.loads((ge / "record.json").read_text())["facts"]
    assert facts["label_sampling"] == "random" and facts["cfg_scale"] == 2.0
    assert math.isfinite(facts["gfid_ref_npz"]) and facts["gfid_ref_npz"] != facts["gfid"]
