"""launcher=slurm against a real SLURM (the local single-node cluster of slurm/start-slurm.sh):
the default grid at tiny sizes gives the local launcher's table, a failing stage is recorded
and the rest goes on, a rerun submits nothing that is finished, a tokenizer job requeued by
`scontrol requeue` or by the timeout/preemption signal (SIGUSR2, through submitit's handler)
resumes from its checkpoint to the same weights, and the generator trains in two SLURM tasks to
the weights of one. Those are skipped, with the reason, when no controller answers; the
launcher-config tests at the end need no cluster.

No assertion here is about speed (benchmark.perf measures that): on the shared 2-core machine a
stage's wall time varies several-fold, so every wait is for a condition, with HANG_S only as a
guard against a hang, and a failed wait shows the jobs' states.
"""
from __future__ import annotations

import itertools
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
HANG_S = 20 * 60  # a wait longer than this is a hang, not a slow machine
# The tokenizer that the requeue tests interrupt: 300 matching steps, so that it is still
# training when its first checkpoint (every 10 steps) appears and the interruption comes.
TOKENIZER = TINY + ["grid=single", "loss=kl", "tokenizer.match_iters=300", "tokenizer.checkpoint_every=10"]
METRICS = ["rfid", "psnr", "ssim", "gfid", "kid", "precision", "recall", "fd_mobilenet_v2",
           "rfd_mobilenet_v2", "latent_swd_to_prior"]


def _sweep(over: list[str]) -> Path:
    return grid.prepare(over)[-1]  # the sweep directory the grid wrote to


def _until(done, what: str, show=lambda: "", poll: float = 0.5) -> None:
    """Poll done() until it is true; after HANG_S fail with `what` and show()'s description."""
    deadline = time.monotonic() + HANG_S
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"hang guard: {what} not reached after {HANG_S} s\n{show()}")
        time.sleep(poll)


def _state(job: str) -> str:
    return launch_slurm.job_states([job]).get(job, "PENDING (not listed yet)")


def _squeue() -> str:
    return subprocess.run(["squeue", "-o", "%i %j %T %r %M"], capture_output=True, text=True).stdout


def _wait(sweep_dir: Path) -> dict:
    """Until this sweep's last aggregate job has ended; returns benchmark.status's view."""
    agg = launch_slurm.load_jobs(sweep_dir)["aggregate"]["job_id"]
    _until(lambda: not launch_slurm.is_active(_state(agg)), f"aggregate job {agg} ended",
           lambda: status.render(status.collect(sweep_dir)) + "\n" + _squeue(), poll=1)
    return status.collect(sweep_dir)


def _wait_job(job: str) -> str:
    """Until `job` has ended (requeues included); returns its final SLURM state."""
    _until(lambda: not launch_slurm.is_active(_state(job)), f"job {job} ended", _squeue, poll=1)
    return _state(job)


def _local(over: list[str]) -> None:
    """The local launcher in this process, with the jobs' single thread (bit-equal CPU math)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert grid.main(over) == 0
    finally:
        torch.set_num_threads(threads)


def _start_now(job: str) -> None:
    """SLURM holds a requeued job back for 2 minutes (reason BeginTime); start it at once."""
    def pending() -> bool:  # the killed run may still be completing
        state = _state(job)
        # A job that ended instead of going back to the queue was not requeued: fail now.
        assert launch_slurm.is_active(state), f"job {job} ended {state} instead of being requeued"
        return state.startswith("PENDING") and "not listed" not in state
    _until(pending, f"job {job} pending again after its requeue", _squeue, poll=0.2)
    # Not in the same second as the requeue: the kill revoked the job's credential, and a start
    # within that second got a credential slurmd counts as revoked too (seconds resolution), so
    # slurmctld killed the job ("Killing non-startable batch JobId=684: Job credential revoked",
    # 0.8 s after "Requeuing JobId=684", in one CI run) and it ended FAILED.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def _await_checkpoint(job: str, tok_dir: Path) -> None:
    """Until the running tokenizer has written its first checkpoint (the point to interrupt it)."""
    polls = itertools.count()

    def ready() -> bool:
        assert not (tok_dir / "record.json").exists(), "the tokenizer finished before it was interrupted"
        if (tok_dir / "ckpt.pt").exists():
            return True
        if next(polls) % 20 == 19:  # now and then (squeue costs CPU the job needs): is it still on?
            state = _state(job)
            assert launch_slurm.is_active(state), f"tokenizer job {job} ended {state} before its first checkpoint"
        return False
    _until(ready, f"tokenizer job {job} wrote {tok_dir / 'ckpt.pt'}", lambda: f"job {job}: {_state(job)}", poll=0.1)


def _assert_same_weights(path: Path, ref: Path) -> None:
    a, b = torch.load(path, weights_only=True), torch.load(ref, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k] - b[k]).abs().max()}"


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
    assert grid.main(over) == 0  # submits and returns (how fast is not a test's business)
    sweep = _sweep(over)
    _local(TINY + ["grid=pair", f"run_root={root / 'local'}"])
    st = _wait(sweep)
    return over, sweep, st


@pytest.fixture(scope="module")
def tokenizer_reference(root):
    """TOKENIZER uninterrupted with the local launcher in this process (one thread, as the jobs),
    run once on first call, while an interrupted job waits; returns its tokenizer.pt."""
    done: list[Path] = []

    def get() -> Path:
        if not done:
            _, cells = config.load(TOKENIZER + [f"run_root={root / 'ref'}"])
            _, (nodes,) = dag.build(cells, root / "ref")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert set(run_local([nodes["reference"], nodes["tokenizer"]]).values()) == {"done"}
            finally:
                torch.set_num_threads(threads)
            done.append(nodes["tokenizer"].dir / "tokenizer.pt")
        return done[0]
    return get


@needs_cluster
def test_default_grid_matches_local_launcher(default_sweep, root):
    _, sweep, st = default_sweep
    assert st["counts"] == {"pending": 0, "running": 0, "done": 14, "failed": 0}, status.render(st)
    assert {c["state"] for c in st["cells"]} == {"done"}
    jobs = launch_slurm.load_jobs(sweep)
    # 14 stages (domain_detector, fid_ref, reference and the dm fake's teacher shared; 5 per cell) + tables
    assert len({j["job_id"] for j in jobs.values()}) == 15
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
    assert "14 stages: 0 pending, 0 running, 14 done, 0 failed" in out


@needs_cluster
def test_failing_stage_recorded_rest_goes_on_and_rerun_resubmits_only_it(default_sweep, root):
    # Same run root and grid (pair: the default grid's base cuts the generator's snapshots, which
    # would change the kl cell's keys): the kl cell, fid_ref and reference are done already and are
    # not resubmitted.
    over = TINY + SLURM + ["grid=pair", f"run_root={root / 'slurm'}",
                           'grid.cells=[["loss=dm","tokenizer.l1_weight=nan"],["loss=kl"]]']
    assert grid.main(over) == 0
    sweep = _sweep(over)
    jobs = launch_slurm.load_jobs(sweep)
    assert sorted(j["stage"] for j in jobs.values()) == ["aggregate", "gen_eval", "generator", "latent_cache",
                                                         "recon_eval", "tokenizer"]
    st = _wait(sweep)
    (cell,) = [c for c in st["cells"] if "/dm" in c["label"]]
    nodes = {s: st["nodes"][k] for s, k in cell["stages"].items()}
    assert cell["state"] == "failed" and nodes["reference"]["state"] == "done"
    tok = nodes["tokenizer"]
    assert tok["state"] == "failed" and "step 0" in tok["reason"] and Path(tok["log"]).exists()
    for s in ("recon_eval", "latent_cache", "generator", "gen_eval"):  # SLURM cancelled them (kill-on-invalid-dep)
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


def _submit_tokenizer(run_root: Path, root: Path) -> tuple[str, str, Path, dict, Path]:
    """TOKENIZER's cell submitted in `run_root`, with the inputs done (copied from the default
    sweep); returns the tokenizer's node key, job id and directory, the sweep's jobs and directory."""
    sl = TOKENIZER + SLURM + [f"run_root={run_root}"]
    if run_root != root / "slurm":
        shutil.copytree(root / "slurm" / "stages", run_root / "stages")
        _, cells = config.load(sl)
        _, (nodes,) = dag.build(cells, run_root)
        for s in ("tokenizer", "recon_eval", "latent_cache", "generator", "gen_eval"):  # another test may have run them
            shutil.rmtree(nodes[s].dir, ignore_errors=True)
    assert grid.main(sl) == 0
    sweep = _sweep(sl)
    jobs = launch_slurm.load_jobs(sweep)
    (key,) = [k for k, j in jobs.items() if j["stage"] == "tokenizer"]
    return key, jobs[key]["job_id"], Path(jobs[key]["dir"]), jobs, sweep


@needs_cluster
def test_requeued_tokenizer_resumes_to_the_same_weights(default_sweep, root, tokenizer_reference):
    key, job, tok_dir, jobs, sweep = _submit_tokenizer(root / "slurm", root)
    _await_checkpoint(job, tok_dir)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _start_now(job)
    ref = tokenizer_reference()  # meanwhile, the same tokenizer uninterrupted
    st = _wait(sweep)
    assert st["counts"]["done"] == 8, status.render(st)  # kl cell: 7 stages + domain_detector
    log_text = Path(jobs[key]["log"]).read_text()
    assert log_text.count(f"{key}: slurm job {job}, task 0/1") == 2  # the same job id ran again (append mode)
    assert f"{key}: slurm job {job} was requeued (restart 1)" in log_text
    assert "resuming from" in (tok_dir / "stage.log").read_text()
    _assert_same_weights(tok_dir / "tokenizer.pt", ref)


@needs_cluster
def test_usr2_signal_checkpoints_requeues_and_resumes_to_the_same_weights(default_sweep, root,
                                                                           tokenizer_reference):
    """The timeout/preemption path: SLURM sends SIGUSR2 `signal_delay_s` before the time limit
    (`--signal=USR2@<delay>`, submitit's default signal); submitit's handler in the task calls
    StageJob.checkpoint, pickles what it returns and runs `scontrol requeue` itself."""
    key, job, tok_dir, jobs, _ = _submit_tokenizer(root / "usr2", root)
    # Only the tokenizer is this test's subject: its dependents would just cost time.
    subprocess.run(["scancel", *[j["job_id"] for k, j in jobs.items() if k != key]], check=True)
    _await_checkpoint(job, tok_dir)
    # What SLURM does at `--signal=USR2@<delay>` and what submitit's own SlurmJob._interrupt
    # does: USR2 to the job's steps, i.e. to the srun'd task where submitit installed its
    # handler (not `--batch`: the batch shell has no handler and would die of it).
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    _start_now(job)  # pending again: requeued by the job itself, not by this test
    ref = tokenizer_reference()
    assert _wait_job(job) == "COMPLETED"
    log_text = Path(jobs[key]["log"]).read_text() + Path(jobs[key]["log"].replace("_log.err", "_log.out")).read_text()
    assert "Caught signal SIGUSR2" in log_text  # submitit's handler received it
    assert f"{key}: caught the timeout/preemption signal in slurm job {job}; requeueing it" in log_text
    assert f"{key}: slurm job {job} was requeued (restart 1)" in log_text
    assert log_text.count(f"{key}: slurm job {job}, task 0/1") == 2
    assert "resuming from" in (tok_dir / "stage.log").read_text()
    _assert_same_weights(tok_dir / "tokenizer.pt", ref)


# Settings under which the generator's weights move far from their initialisation in TINY's 8
# steps, so that a wrong gradient shows: no learning-rate warm-up (cpu-tiny's 100 steps would
# reach 8% of the rate), a rate of 1e-2 (Adam moves a weight by about the rate per step; at
# cpu-tiny's 1e-3 eight steps change the weights by ~4% of their norm) and EMA decay 0, so that
# ema.pt holds the raw weights (at 0.99 it would still be 92% initialisation).
MOVING = ["generator.lr_warmup_steps=1", "generator.lr=1e-2", "generator.ema_decay=0"]
# 2 tasks vs 1: the same global batch, summed in another order (the all-reduce), then 8 Adam
# steps; bounded relative to how far training moved the weights (|2 tasks - 1| / |1 - init|).
# Measured: the weights move 24% of their norm (up to 0.08 per weight) and the two runs differ by
# 1.6e-6 of that move; with the gradient all-reduce skipped (each task steps on its half batch)
# they differ by 0.85 of it. Under the old settings (warm-up 100, EMA 0.99, lr 1e-3) the weights
# moved by 3e-5 of their norm (at most 1.2e-5 per weight), and assert_close's rtol=1e-5, atol=1e-6
# allowed about a quarter of that move.
DDP_REL_TOL = 1e-4


@needs_cluster
def test_generator_data_parallel_in_two_tasks(default_sweep, root):
    """launcher.stages.generator.tasks_per_node=2: both tasks train, rank 0 writes, and the weights
    are those of one process up to the order of float sums."""
    from benchmark.stages.generator import build_model
    over = TINY + MOVING + ["grid=single", "loss=kl"]
    sl = over + SLURM + [f"run_root={root / 'ddp'}", "launcher.stages.generator.tasks_per_node=2"]
    for r in ("ddp", "ddp-ref"):  # the cell's inputs are done
        shutil.copytree(root / "slurm" / "stages", root / r / "stages")
    _, cells = config.load(sl)
    _, (nodes,) = dag.build(cells, root / "ddp")
    assert grid.main(sl) == 0
    jobs = launch_slurm.load_jobs(_sweep(sl))
    assert sorted(j["stage"] for j in jobs.values()) == ["aggregate", "gen_eval", "generator"]
    (gen_job,) = [j["job_id"] for j in jobs.values() if j["stage"] == "generator"]
    subprocess.run(["scancel", *[j["job_id"] for j in jobs.values() if j["job_id"] != gen_job]], check=True)
    # Meanwhile the same generator in one process (the local launcher, one thread as the jobs).
    _, cells = config.load(over + [f"run_root={root / 'ddp-ref'}"])
    _, (ref,) = dag.build(cells, root / "ddp-ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert set(run_local([ref["tokenizer"], ref["latent_cache"], ref["generator"]]).values()) == {"done"}
    finally:
        torch.set_num_threads(threads)
    assert _wait_job(gen_job) == "COMPLETED"
    facts = json.loads((nodes["generator"].dir / "record.json").read_text())["facts"]
    assert facts["generator_world_size"] == 2
    a = torch.load(nodes["generator"].dir / "ema.pt", weights_only=True)
    b = torch.load(ref["generator"].dir / "ema.pt", weights_only=True)
    cfg = nodes["generator"].cfg
    torch.manual_seed(int(cfg["seed"]) + 1)  # as generator.train does before building the model
    init = build_model(cfg, class_dropout_prob=0.0).state_dict()
    keys = [k for k in b if b[k].is_floating_point()]
    flat = {n: torch.cat([t[k].flatten().double() for k in keys]) for n, t in (("a", a), ("b", b), ("init", init))}
    moved = (flat["b"] - flat["init"]).norm()
    apart = (flat["a"] - flat["b"]).norm()
    numbers = (f"|1 task - init| / |init| = {moved / flat['init'].norm():.3g}, |2 tasks - 1 task| / "
               f"|1 task - init| = {apart / moved:.3g}, max |2 tasks - 1 task| = {(flat['a'] - flat['b']).abs().max():.3g}")
    logging.getLogger(__name__).info("generator weights: %s", numbers)
    assert moved > 0.1 * flat["init"].norm(), f"training barely moved the weights, nothing to compare: {numbers}"
    assert apart <= DDP_REL_TOL * moved, f"2 tasks do not train as 1 (tolerance {DDP_REL_TOL}): {numbers}"


# ---------------------------------------------------------------- launcher config, no cluster needed
def _launcher(over: list[str]) -> dict:
    base, _ = config.load(["grid=single", "launcher=slurm", *over])
    return launch_slurm.resolve(base["launcher"], ["launcher=slurm", *over])


def test_profile_then_command_line_wins():
    cfg = _launcher(["launcher.profile=gpu-cluster", "launcher.cpus_per_task=3",
                     "launcher.stages.generator.tasks_per_node=4"])
    gen = launch_slurm.stage_resources(cfg, "generator")
    assert (gen["partition"], gen["gpus_per_node"], gen["tasks_per_node"], gen["cpus_per_task"]) == ("gpu", 8, 4, 3)
    agg = launch_slurm.executor_parameters(cfg, "aggregate", "x")  # no GPU: no --gpus-per-node at all
    assert "gpus_per_node" not in agg and agg["partition"] == "gpu" and agg["mem"] == f"{8 * 1024}MB"
    local = launch_slurm.stage_resources(_launcher(["launcher.profile=local"]), "tokenizer")
    assert (local["partition"], local["cpus_per_task"], local["gpus_per_node"]) == ("debug", 1, 0)


@pytest.mark.parametrize("over, message", [
    (["launcher.profile=nope"], "Known profiles: gpu-cluster, local"),
    (["launcher.stages.aggregate.tasks_per_node=2"], "the stages that run data-parallel are"),
    (["launcher.mem_gb=0"], "mem_gb"),
    (["+launcher.stages.decoder.mem_gb=1"], "unknown stage"),
])
def test_bad_launcher_config_rejected_before_submission(over, message, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(launch_slurm, "submit", lambda *a, **k: pytest.fail("submitted"))
    assert grid.main(["grid=single", "launcher=slurm", f"run_root={tmp_path}", *over]) == 2
    assert message in caplog.text
    assert not (tmp_path / "stages").exists() and not (tmp_path / "slurm").exists()


@needs_cluster
def test_two_sweeps_that_share_a_stage_submit_it_once(tmp_path):
    """The second sweep finds the first one's claim in the shared run directory and depends on
    that job instead of submitting the stage again (fid_ref: every cell of a dataset has it)."""
    base = TINY + SLURM + ["grid=single", "loss=kl", f"run_root={tmp_path}"]
    one, two = base + ["prior=gaussian"], base + ["prior=gmm"]
    ids: list[str] = []
    try:
        assert grid.main(one) == 0
        j1 = launch_slurm.load_jobs(_sweep(one))
        ids += [j["job_id"] for j in j1.values()]
        # Held, so that none finishes (and counts as done) before the second sweep looks.
        subprocess.run(["scontrol", "hold", ",".join(ids)], check=True, capture_output=True)
        assert grid.main(two) == 0
        j2 = launch_slurm.load_jobs(_sweep(two))
        ids += [j["job_id"] for j in j2.values()]
        shared = (set(j1) & set(j2)) - {"aggregate"}
        stages = {j1[k]["stage"] for k in shared}
        assert "fid_ref" in stages, stages
        for k in shared:
            assert j2[k]["job_id"] == j1[k]["job_id"] and j2[k]["claimed_by"] == str(_sweep(one))
        assert not {j2[k]["job_id"] for k in set(j2) - shared} & {j["job_id"] for j in j1.values()}
        # The second sweep's recon_eval waits on the first sweep's fid_ref job.
        rec = next(k for k, j in j2.items() if j["stage"] == "recon_eval")
        fid = next(k for k in shared if j1[k]["stage"] == "fid_ref")
        dep = subprocess.run(["scontrol", "show", "job", j2[rec]["job_id"]], capture_output=True, text=True).stdout
        assert j1[fid]["job_id"] in dep.split("Dependency=")[1].split()[0]
    finally:
        if ids:
            subprocess.run(["scancel", *sorted(set(ids))], capture_output=True)
