"""Data-parallel generator training: launcher variables, the one-process path (no process group),
exact resume, and two torchrun processes against one process with the same global batch."""
from __future__ import annotations

import shutil

import pytest
import torch

from _launch import launch, strip_launch_env
from benchmark import config, distributed, run_stage
from benchmark.distributed import DistInfo, first_host, launch_env
from benchmark.stages import generator
from benchmark.store import read_json
from benchmark.training import Checkpoint

# Two processes vs one on the 2-core reference machine (gloo, fp32, 8 steps, lr 1e-3): the
# largest difference was 7.4e-7 of a tensor's largest entry (6e-8 absolute), from the order of
# float sums (DDP's bucketed all-reduce, per-slice BLAS calls), while training moved every tensor
# by more than 4e-3. The bound leaves a factor ~13 of headroom.
REL_TOL = 1e-5

# ema_decay=0 makes ema.pt the raw weights (every step's update undamped in the comparison); a
# short warm-up lets the weights move; label dropout 0.5 makes the shared dropout mask matter.
EXACT = ["generator.ema_decay=0", "generator.lr_warmup_steps=1", "generator.label_dropout=0.5"]


class Killed(BaseException):
    """Stands in for kill -9: nothing of the stage runs after it (not even `except Exception`)."""


_save = Checkpoint.save


def _save_then_die(self, step, **state):
    _save(self, step, **state)
    raise Killed(f"killed after the checkpoint of step {step}")


def _forbidden(*args, **kwargs):
    raise AssertionError("a single process must not create a process group")


def _cfg(tiny_overrides, *extra: str) -> dict:
    return config.load(["grid=single", *tiny_overrides, *extra])[1][0].cfg


def _latents(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from benchmark.dag import latent_shape
    g = torch.Generator().manual_seed(0)
    n = int(cfg["generator"]["train_images"])
    return torch.randn(n, *latent_shape(cfg), generator=g), torch.randint(10, (n,), generator=g)


def _worst_relative_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def test_launch_env_reads_torchrun_then_slurm():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n7",
                "MASTER_PORT": "1234", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}
    assert launch_env(torchrun) == distributed.LaunchEnv(3, 4, 1, "n7", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[003-004,9],cpu1", "SLURM_JOB_ID": "123456"}
    assert launch_env(slurm) == distributed.LaunchEnv(5, 8, 1, "gpu003", 15000 + 123456 % 20000, "slurm")
    pinned = launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "999"})
    assert (pinned.master_addr, pinned.master_port) == ("head", 999)
    assert launch_env({}).source == launch_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).source == "none"
    with pytest.raises(RuntimeError, match="srun"):  # a batch script with --ntasks=4 but no srun
        launch_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"})
    assert [first_host(s) for s in ("node1", "a[01-03]", "a[7,9]-ib,b2", "x1,y[2-3]")] == \
        ["node1", "a01", "a7-ib", "x1"]


def test_world_size_one_never_initialises_a_process_group(tiny_overrides, tmp_path, monkeypatch):
    strip_launch_env(monkeypatch)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # torchrun --nproc_per_node=1
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.distributed, "init_process_group", _forbidden)
    cfg = _cfg(tiny_overrides)
    try:
        info = distributed.init_from_env("cpu")
        assert info == DistInfo(0, 1, 0, torch.device("cpu")) and distributed.is_main()
        facts = generator.train(cfg, *_latents(cfg), tmp_path)
        x = torch.tensor(3.0)
        assert distributed.all_reduce_mean(x) is x
        assert not torch.distributed.is_initialized()
        assert facts["generator_world_size"] == 1 and (tmp_path / "ema.pt").exists()
    finally:
        distributed.cleanup()


# Rank 1 is late to the end of the run: it leaves a marker, then finishes. Rank 0 reaches
# finish() first, so once finish() has returned on rank 0 the marker must be there; a finish()
# without its barrier would return at once. Both ranks end with no process group, and cleanup()
# after finish() (what the `finally` blocks do) is a no-op.
FINISH_SCRIPT = """
import pathlib, sys, time
import torch
from benchmark import distributed
out = pathlib.Path(sys.argv[1])
info = distributed.init_from_env("cpu")
if info.rank == 1:
    time.sleep(2.0)
    (out / "rank1_reached_finish").touch()
distributed.finish()
seen = (out / "rank1_reached_finish").exists()
distributed.cleanup()
(out / f"rank{info.rank}.txt").write_text(f"{seen} {torch.distributed.is_initialized()}")
"""


def test_finish_waits_for_every_rank_then_tears_the_group_down(tmp_path):
    script = tmp_path / "finish_check.py"
    script.write_text(FINISH_SCRIPT)
    launch(str(script), str(tmp_path), timeout=120)
    assert (tmp_path / "rank0.txt").read_text() == "True False"
    assert (tmp_path / "rank1.txt").read_text() == "True False"


def test_global_batch_must_divide_over_the_processes(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides)  # generator.batch_size=16
    with pytest.raises(ValueError, match="batch_size=16 .* multiple of 3"):
        generator.train(cfg, *_latents(cfg), tmp_path, DistInfo(rank=0, world_size=3))


def test_generator_resume_after_a_kill_is_exact(tiny_overrides, tmp_path, monkeypatch, caplog):
    cfg = _cfg(tiny_overrides, "generator.label_dropout=0.5")  # 8 steps, a checkpoint every 4
    z, y = _latents(cfg)
    generator.train(cfg, z, y, tmp_path / "a")
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", _save_then_die)
        with pytest.raises(Killed):
            generator.train(cfg, z, y, tmp_path / "b")
    assert (tmp_path / "b" / "ckpt.pt").exists() and not (tmp_path / "b" / "ema.pt").exists()
    caplog.set_level("INFO")
    generator.train(cfg, z, y, tmp_path / "b")
    assert "resuming from" in caplog.text and not (tmp_path / "b" / "ckpt.pt").exists()
    a, b = (torch.load(tmp_path / d / "ema.pt", weights_only=True) for d in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _torchrun(over: list[str]) -> str:
    proc = launch("-m", "benchmark.run_stage", "--stage", "generator", *over)
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process(tiny_overrides, tmp_path, monkeypatch):
    """Through the CLI: 1 process (A) vs 2 processes from scratch (B) vs 2 processes resuming a
    one-process run killed after its step-4 checkpoint (C), same global batch of 16."""
    strip_launch_env(monkeypatch)
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + EXACT
    a, b, c = (tmp_path / n for n in "abc")
    for stage in ("reference", "teacher", "tokenizer", "latent_cache"):  # teacher: the dm fake's start
        assert run_stage.main(["--stage", stage, *over, f"run_root={a}"]) == 0
    assert run_stage.main(["--stage", "generator", *over, f"run_root={b}"]) == 2  # upstream missing
    for d in (b, c):
        shutil.copytree(a / "stages", d / "stages")
    with monkeypatch.context() as m:
        m.setattr(torch.distributed, "init_process_group", _forbidden)
        assert run_stage.main(["--stage", "generator", *over, f"run_root={a}"]) == 0
        m.setattr(Checkpoint, "save", _save_then_die)
        with pytest.raises(Killed):
            run_stage.main(["--stage", "generator", *over, f"run_root={c}"])
    assert list(c.glob("stages/generator/*/ckpt.pt"))
    _torchrun(over + [f"run_root={b}"])
    assert "resuming from" in _torchrun(over + [f"run_root={c}"])

    ref = torch.load(next(a.glob("stages/generator/*/ema.pt")), weights_only=True)
    for root in (b, c):
        (d,) = root.glob("stages/generator/*")
        # ema_0NN.pt: the cpu-tiny preset's EMA snapshots at 25/50/75% (rank 0 writes them too)
        # attempts.json, progress.json, tb/: the monitor's files (benchmark/monitor.py)
        assert sorted(p.name for p in d.iterdir()) == ["attempts.json", "config.yaml", "ema.pt", "ema_025.pt",
                                                       "ema_050.pt", "ema_075.pt", "progress.json", "record.json",
                                                       "slice.json", "stage.log", "tb"]
        rec = read_json(d / "record.json")
        assert rec["facts"]["generator_world_size"] == 2 and rec["world_size"] == 2
        # C ran twice (1 process killed, then 2): both attempts count in its device-hours
        assert rec["attempts"] == (2 if root == c else 1)
        worst = _worst_relative_diff(ref, torch.load(d / "ema.pt", weights_only=True))
        assert worst <= REL_TOL, f"{root.name}: 2 processes differ from 1 by {worst:.2e} (relative)"
    assert run_stage.main(["--stage", "generator", *over, f"run_root={b}"]) == 0  # done: skipped
