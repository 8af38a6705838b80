"""Sharded gen_eval (benchmark/stages/gen_eval.py, sample_shards.py): the same samples and metrics
on 1 process and on 2 gloo processes, the same files and metrics after a kill -9 and a rerun, the
ADM-format samples.npz, and the checks of the eval=paper preset and of eval.ref_npz.

The three gen_eval runs share one set of upstream stages (copied), run as subprocesses with one
intra-op thread each, so that any difference comes from the sharding, not from float sums split
over another number of threads."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _launch import launch, launch_background
from benchmark import config, dag
from benchmark.launch import run_node
from benchmark.settings import EvalSettings, SettingsError
from benchmark.stages import sample_shards as shards
from benchmark.store import read_json
from conftest import TINY

# 40 Inception samples, 50 domain samples in shards of 8 (7 main shards, the last one short), and
# 4 EMA snapshots of 12 (2 shards each). The SDE sampler, so that the sampler's own noise (not only
# the initial noise) must come from the shard's generator.
OVER = [o for o in TINY if not o.startswith("eval.extra_detectors")] + [
    "loss=none", "eval.extra_detectors=[]", "eval.n_samples=40", "eval.domain.n_samples=50",
    "eval.domain.snapshot_n_samples=12", "eval.shard_size=8", "eval.save_npz=true",
    "eval.sampler.method=euler_maruyama"]
N_SHARD_FILES = 7 + 4 * 2
# Facts that describe the run, not the samples: they may differ between equal runs.
RUN_FACTS = {"gen_eval_world_size", "peak_rss_mb_rank0"}


def _args(root: Path) -> list[str]:
    return ["-m", "benchmark.run_stage", "--stage", "gen_eval", *OVER, f"run_root={root}"]


def _run(root: Path, procs: int) -> str:
    proc = launch(*_args(root), nproc=procs)
    return proc.stdout + proc.stderr


def _stage_dir(root: Path) -> Path:
    (d,) = root.glob("stages/gen_eval/*")
    return d


def _files(d: Path) -> dict[str, bytes]:
    """Every shard file and samples.npz, by name."""
    out = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted((d / shards.SHARD_DIR).glob("*.pt"))}
    out[shards.NPZ_NAME] = (d / shards.NPZ_NAME).read_bytes()
    return out


def _facts(d: Path) -> dict:
    return {k: v for k, v in read_json(d / "record.json")["facts"].items() if k not in RUN_FACTS}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """Every stage but gen_eval, finished once for the module."""
    root = tmp_path_factory.mktemp("upstream")
    _, cells = config.load(["grid=single", *OVER, f"run_root={root}"])
    order, _ = dag.build(cells, root)
    for node in order:
        if node.stage != "gen_eval":
            run_node(node)
    return root


def _copy(upstream: Path, dst: Path) -> Path:
    shutil.copytree(upstream / "stages", dst / "stages")
    return dst


def test_plan_covers_every_shard_once_whatever_the_world_size():
    plan = shards.ShardPlan("main", 50, 8)
    assert plan.count == 7 and plan.bounds(6) == (48, 50)
    for world in range(1, 6):
        got = sorted(i for r in range(world) for i in plan.mine(r, world))
        assert got == list(range(plan.count)), world
    seeds = {shards.shard_seed(b, i) for b in (1000, 1001, 2000) for i in range(200)}
    assert len(seeds) == 600 and max(seeds) < 2**32  # distinct 32-bit streams (mt19937 reads 32 bits)


def test_balanced_labels_give_the_adm_50_per_class():
    labels = shards.set_labels("balanced", 50_000, 1000, seed=0)
    assert torch.equal(torch.bincount(labels, minlength=1000), torch.full((1000,), 50))


def test_one_and_two_processes_and_a_killed_run_agree(upstream, tmp_path):
    a, b, c = (_copy(upstream, tmp_path / n) for n in "abc")
    t0 = time.perf_counter()
    _run(a, 1)
    t1 = time.perf_counter()
    _run(b, 2)
    t2 = time.perf_counter()
    # C: one process, killed with SIGKILL once two main shards are on disk, then run again.
    proc = launch_background(*_args(c), nproc=1)
    deadline = time.monotonic() + 240
    while len(list(c.glob("stages/gen_eval/*/shards/main_*.pt"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "gen_eval ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    dc = _stage_dir(c)
    left = len(list((dc / shards.SHARD_DIR).glob("*.pt")))
    assert not (dc / "record.json").exists() and 2 <= left < N_SHARD_FILES, left
    resumed = _run(c, 1)
    t3 = time.perf_counter()
    assert resumed.count("already on disk: skipped") >= 2
    print(f"gen_eval: 1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s, killed + rerun {t3 - t2:.1f} s")

    da, db = _stage_dir(a), _stage_dir(b)
    assert da.name == db.name == dc.name  # one config, one stage directory
    files = _files(da)
    assert len(files) == N_SHARD_FILES + 1
    for other in (db, dc):  # byte for byte: images, labels, every detector's features, samples.npz
        theirs = _files(other)
        assert theirs.keys() == files.keys()
        assert [k for k in files if files[k] != theirs[k]] == []
    fa = _facts(da)
    assert _facts(db) == fa and _facts(dc) == fa  # every metric, exactly
    assert read_json(db / "record.json")["facts"]["gen_eval_world_size"] == 2
    assert fa["n_samples"] == 40 and fa["n_samples_domain"] == 50 and fa["shards"] == 7
    assert {"gfid", "fd_domain", "snap100_fd_domain", "gfid_lo", "kid"} <= fa.keys()

    # samples.npz as guided-diffusion's evaluator reads it: uint8 NHWC RGB, class-balanced labels.
    with np.load(da / shards.NPZ_NAME) as npz:
        x, y = npz["arr_0"], npz["arr_1"]
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(y, np.arange(40) % 10)
    first = torch.load(da / shards.SHARD_DIR / "main_00000.pt", weights_only=True)
    assert np.array_equal(x[:8], first["images"].expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
    assert first["images"].dtype == torch.uint8 and first["features"]["inception-v3-compat"]["pool"].shape == (8, 2048)


def test_paper_preset():
    _, (cell,) = config.load(["grid=single", "eval=paper"])
    ev = EvalSettings.from_dict(cell.cfg["eval"], "eval")
    assert (ev.n_samples, ev.n_ref, ev.precision, ev.label_mode) == (50_000, 50_000, "fp32", "balanced")
    assert (ev.sampler.method, ev.sampler.steps) == ("euler_maruyama", 250)  # DMVAE_METHOD.md
    assert ev.detector == "inception-v3-compat" and ev.save_npz and not ev.domain.enabled
    assert ev.ref_npz is None and ev.preset == "paper" and ev.reproduces


def test_ref_npz_is_checked_with_the_config(tmp_path):
    missing = tmp_path / "nowhere" / "VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(SettingsError, match=f"eval.ref_npz: no file at {missing}"):
        config.load(["grid=single", f"eval.ref_npz={missing}"])  # a declared key: no '+' needed
    no_sigma = tmp_path / "mu_only.npz"
    np.savez(no_sigma, mu=np.zeros(4))
    with pytest.raises(SettingsError, match=f"{no_sigma} has no sigma array; it holds mu"):
        config.load(["grid=single", "eval=paper", f"eval.ref_npz={no_sigma}"])
    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    _, (cell,) = config.load(["grid=single", "eval=paper", f"eval.ref_npz={good}"])
    assert cell.cfg["eval"]["ref_npz"] == str(good)
    # The reference enters gen_eval's key (its gfid_ref_npz), and no other stage's.
    _, (plain,) = config.load(["grid=single", "eval=paper"])
    with_ref, without = (dag.build([c], tmp_path)[1][0] for c in (cell, plain))
    assert [s for s in with_ref if with_ref[s].key != without[s].key] == ["gen_eval"]


def test_precision_recall_switch_to_blocks_past_the_row_limit(monkeypatch):
    """Past AUTO_BLOCK_ROWS (10,000: 50,000 x 50,000 whole matrices would take 20 GB each),
    precision/recall go through the blocked path unasked, with the same numbers. The limit is
    lowered here so that the switch happens at a size a test can afford."""
    from benchmark.metrics import generation
    g = torch.Generator().manual_seed(1)
    gen, ref = {"pool": torch.randn(300, 8, generator=g) + 0.3}, {"pool": torch.randn(260, 8, generator=g)}
    whole = generation.generation_metrics(gen, ref, kid_subset_size=100)
    monkeypatch.setattr(generation, "AUTO_BLOCK_ROWS", 280)
    monkeypatch.setattr(generation, "AUTO_BLOCK", 64)
    blocked = generation.generation_metrics(gen, ref, kid_subset_size=100)
    assert blocked == whole and 0 < whole["precision"] < 1 and 0 < whole["recall"] < 1
