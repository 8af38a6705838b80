"""launcher=slurm against a real SLURM (the local single-node cluster of slurm/start-slurm.sh):
the default grid at tiny sizes gives the local launcher's table, a failing stage is recorded
and the rest goes on, a rerun submits nothing that is finished, a requeued tokenizer job
resumes from its checkpoint to the same weights, and the generator trains in two SLURM tasks.
Those are skipped, with the reason, when no controller answers; the launcher-config tests at the
end need no cluster.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark import config, dag, grid, launch_slurm, status
from benchmark.launch import run_local
from conftest import TINY

_WHY = launch_slurm.controller_reachable()
pytestmark = pytest.mark.slurm
needs_cluster = pytest.mark.skipif(_WHY is not None, reason=f"no SLURM: {_WHY}; start it with "
                                                            f"`sudo bash slurm/start-slurm.sh`")

SLURM = ["launcher=slurm", "launcher.profile=local"]
METRICS = ["rfid", "psnr", "ssim", "gfid", "kid", "precision", "recall", "fd_mobilenet_v2",
           "rfd_mobilenet_v2", "latent_swd_to_prior"]


def _sweep(over: list[str]) -> Path:
    return grid.prepare(over)[-1]  # the sweep directory the grid wrote to


def _wait(sweep_dir: Path, timeout: float = 240) -> dict:
    """Until this sweep's last aggregate job has ended; returns benchmark.status's view."""
    agg = launch_slurm.load_jobs(sweep_dir)["aggregate"]["job_id"]
    deadline = time.time() + timeout
    while launch_slurm.is_active(launch_slurm.job_states([agg]).get(agg, "PENDING")):
        assert time.time() < deadline, status.render(status.collect(sweep_dir))
        time.sleep(1)
    return status.collect(sweep_dir)


def _local(over: list[str]) -> None:
    """The local launcher in this process, with the jobs' single thread (bit-equal CPU math)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert grid.main(over) == 0
    finally:
        torch.set_num_threads(threads)


def _start_now(job: str, timeout: float = 60) -> None:
    """SLURM holds a requeued job back for 2 minutes (reason BeginTime); start it at once."""
    deadline = time.time() + timeout
    while (state := subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                                   text=True).stdout.strip()) != "PENDING":
        assert time.time() < deadline, f"requeued job {job} is {state!r}, not PENDING"
        time.sleep(0.2)  # the killed run is still completing
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_job():
    """Jobs inherit this environment: one intra-op thread, as the local reference runs with."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if old is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def default_sweep(root):
    """The gaussian-vs-kl grid submitted to SLURM; while it runs, the same grid run locally."""
    over = TINY + SLURM + ["grid=pair", f"run_root={root / 'slurm'}"]
    t0 = time.perf_counter()
    assert grid.main(over) == 0
    assert time.perf_counter() - t0 < 60  # submits and returns
    sweep = _sweep(over)
    _local(TINY + ["grid=pair", f"run_root={root / 'local'}"])
    st = _wait(sweep)
    return over, sweep, st


@needs_cluster
def test_default_grid_matches_local_launcher(default_sweep, root):
    _, sweep, st = default_sweep
    assert st["counts"] == {"pending": 0, "running": 0, "done": 10, "failed": 0}, status.render(st)
    assert {c["state"] for c in st["cells"]} == {"done"}
    jobs = launch_slurm.load_jobs(sweep)
    assert len({j["job_id"] for j in jobs.values()}) == 11  # 10 stages (fid_ref, reference shared) + tables
    assert sum(j["stage"] == "fid_ref" for j in jobs.values()) == 1
    a = pd.read_csv(sweep / "results.csv").set_index("loss")
    b = pd.read_csv(next((root / "local" / "sweeps").iterdir()) / "results.csv").set_index("loss")
    assert (a["status"] == "done").all() and a["gfid"].map(math.isfinite).all()
    pd.testing.assert_frame_equal(a.loc[b.index, METRICS], b[METRICS], rtol=1e-6)


@needs_cluster
def test_rerun_submits_nothing_finished(default_sweep, caplog):
    over, sweep, _ = default_sweep
    before = launch_slurm.load_jobs(sweep)
    caplog.set_level(logging.INFO)
    assert grid.main(over) == 0
    assert "all done, nothing submitted" in caplog.text
    assert launch_slurm.load_jobs(sweep) == before
    assert "| gaussian |" in (sweep / "results.md").read_text()
    out = subprocess.run([sys.executable, "-m", "benchmark.status", str(sweep)], capture_output=True, text=True,
                         check=True).stdout
    assert "10 stages: 0 pending, 0 running, 10 done, 0 failed" in out


@needs_cluster
def test_failing_stage_recorded_rest_goes_on_and_rerun_resubmits_only_it(default_sweep, root):
    # Same run root: the kl cell, fid_ref and reference are done already and are not resubmitted.
    over = TINY + SLURM + [f"run_root={root / 'slurm'}",
                           'grid.cells=[["loss=dm","tokenizer.l1_weight=nan"],["loss=kl"]]']
    assert grid.main(over) == 0
    sweep = _sweep(over)
    jobs = launch_slurm.load_jobs(sweep)
    assert sorted(j["stage"] for j in jobs.values()) == ["aggregate", "gen_eval", "generator", "recon_eval",
                                                         "tokenizer"]
    st = _wait(sweep)
    (cell,) = [c for c in st["cells"] if "/dm" in c["label"]]
    nodes = {s: st["nodes"][k] for s, k in cell["stages"].items()}
    assert cell["state"] == "failed" and nodes["reference"]["state"] == "done"
    tok = nodes["tokenizer"]
    assert tok["state"] == "failed" and "step 0" in tok["reason"] and Path(tok["log"]).exists()
    for s in ("recon_eval", "generator", "gen_eval"):  # SLURM cancelled them (kill-on-invalid-dep)
        assert nodes[s]["state"] == "failed" and "input tokenizer failed" in nodes[s]["reason"]
        assert nodes[s]["slurm_state"] == "CANCELLED"
    df = pd.read_csv(sweep / "results.csv").set_index("loss")
    assert df.loc["dm", "status"] == "failed" and "step 0" in df.loc["dm", "failure"]
    assert df.loc["kl", "status"] == "done" and math.isfinite(df.loc["kl", "gfid"])
    # A rerun submits the failed stage and its dependents again, nothing else.
    failed = {k for k, j in jobs.items() if k != "aggregate"}
    assert grid.main(over) == 0
    again = launch_slurm.load_jobs(sweep)
    assert {k for k in again if k != "aggregate" and again[k]["job_id"] != jobs[k]["job_id"]} == failed
    assert all(again[k]["previous"] == [jobs[k]["job_id"]] for k in failed)
    subprocess.run(["scancel", *[again[k]["job_id"] for k in again]], check=False)  # they would fail again


@needs_cluster
def test_requeued_tokenizer_resumes_to_the_same_weights(default_sweep, root):
    over = TINY + ["grid=single", "loss=kl", "tokenizer.match_iters=300", "tokenizer.checkpoint_every=10"]
    sl = over + SLURM + [f"run_root={root / 'slurm'}"]
    assert grid.main(sl) == 0
    sweep = _sweep(sl)
    jobs = launch_slurm.load_jobs(sweep)
    (key,) = [k for k, j in jobs.items() if j["stage"] == "tokenizer"]
    job, tok_dir = jobs[key]["job_id"], Path(jobs[key]["dir"])
    deadline = time.time() + 180
    while not (tok_dir / "ckpt.pt").exists():  # requeue once the tokenizer has checkpointed
        assert time.time() < deadline and not (tok_dir / "record.json").exists(), "tokenizer never checkpointed"
        time.sleep(0.05)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _start_now(job)
    # Meanwhile the same tokenizer with the local launcher, in its own run root.
    base, cells = config.load(over + [f"run_root={root / 'ref'}"])
    order, per_cell = dag.build(cells, root / "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert set(run_local([per_cell[0]["reference"], per_cell[0]["tokenizer"]]).values()) == {"done"}
    finally:
        torch.set_num_threads(threads)
    st = _wait(sweep)
    assert st["counts"]["done"] == 6, status.render(st)
    started = Path(jobs[key]["log"]).read_text().count(f"{key}: slurm job {job}, task 0/1")
    assert started == 2  # the same job id ran again (the log is opened in append mode)
    assert "resuming from" in (tok_dir / "stage.log").read_text()
    a = torch.load(tok_dir / "tokenizer.pt", weights_only=True)
    b = torch.load(per_cell[0]["tokenizer"].dir / "tokenizer.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@needs_cluster
def test_generator_data_parallel_in_two_tasks(default_sweep, root):
    """launcher.stages.generator.tasks_per_node=2: both tasks train, rank 0 writes, same weights."""
    over = TINY + SLURM + ["grid=single", "loss=kl", f"run_root={root / 'ddp'}",
                           "launcher.stages.generator.tasks_per_node=2"]
    shutil.copytree(root / "slurm" / "stages", root / "ddp" / "stages")  # the cell's inputs are done
    base, cells = config.load(over)
    _, (nodes,) = dag.build(cells, root / "ddp")
    shutil.rmtree(nodes["generator"].dir)
    shutil.rmtree(nodes["gen_eval"].dir)
    assert grid.main(over) == 0
    sweep = _sweep(over)
    assert sorted(j["stage"] for j in launch_slurm.load_jobs(sweep).values()) == ["aggregate", "gen_eval",
                                                                                  "generator"]
    st = _wait(sweep)
    assert st["counts"]["done"] == 6, status.render(st)
    facts = json.loads((nodes["generator"].dir / "record.json").read_text())["facts"]
    assert facts["generator_world_size"] == 2
    a = torch.load(nodes["generator"].dir / "ema.pt", weights_only=True)
    b = torch.load(root / "slurm" / "stages" / "generator" / nodes["generator"].key / "ema.pt", weights_only=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float sums in another order only


# ---------------------------------------------------------------- launcher config, no cluster needed
def _launcher(over: list[str]) -> dict:
    base, _ = config.load(["grid=single", "launcher=slurm", *over])
    return launch_slurm.resolve(base["launcher"], ["launcher=slurm", *over])


def test_profile_then_command_line_wins():
    cfg = _launcher(["launcher.profile=gpu-cluster", "launcher.cpus_per_task=3",
                     "launcher.stages.generator.tasks_per_node=4"])
    gen = launch_slurm.stage_resources(cfg, "generator")
    assert (gen["partition"], gen["gpus_per_node"], gen["tasks_per_node"], gen["cpus_per_task"]) == ("gpu", 8, 4, 3)
    ref = launch_slurm.executor_parameters(cfg, "reference", "x")
    assert "gpus_per_node" not in ref and ref["partition"] == "gpu" and ref["mem"] == f"{16 * 1024}MB"
    local = launch_slurm.stage_resources(_launcher(["launcher.profile=local"]), "tokenizer")
    assert (local["partition"], local["cpus_per_task"], local["gpus_per_node"]) == ("debug", 1, 0)


@pytest.mark.parametrize("over, message", [
    (["launcher.profile=nope"], "Known profiles: gpu-cluster, local"),
    (["launcher.stages.recon_eval.tasks_per_node=2"], "only the tokenizer and the generator"),
    (["launcher.mem_gb=0"], "mem_gb"),
    (["+launcher.stages.decoder.mem_gb=1"], "unknown stage"),
])
def test_bad_launcher_config_rejected_before_submission(over, message, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launch_slurm, "submit", lambda *a, **k: pytest.fail("submitted"))
    assert grid.main(["grid=single", "launcher=slurm", f"run_root={tmp_path}", *over]) == 2
    assert message in caplog.text
    assert not (tmp_path / "stages").exists() and not (tmp_path / "slurm").exists()
