"""One whole grid cell on a file-backed ImageNet-layout dataset, at tiny sizes and 32 px: folder
data -> tokenizer -> latent cache -> generator -> sharded gen_eval, with the two data-parallel
stages (latent_cache, gen_eval) run as 2 gloo processes under torchrun and killed with SIGKILL
midway, then rerun. Each interrupted stage must end with the same files, byte for byte, and the
same metrics as the uninterrupted run of the same cell in another run root (one process, in this
pytest process, one intra-op thread).

The pieces have their own tests (test_datasets_folder.py, test_latent_cache.py,
test_gen_eval_sharded.py); this file checks that they fit together on real JPEG/PNG files:
mixed sizes and modes, one corrupt file, 4 classes, the ADM crop, flips in the cache and in the
generator's draws, and resume of both sharded stages with 2 ranks.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from _launch import launch, launch_background, strip_launch_env
from benchmark import config, dag, run_stage
from benchmark.stages import latent_cache as lc
from benchmark.stages import sample_shards as shards
from benchmark.store import read_json
from conftest import TINY
from test_datasets_folder import MODES, SIZES, _image, _save
from test_gen_eval_sharded import _files as _eval_files  # every shard file and samples.npz

WNIDS = ("n04", "n01", "n03", "n02")  # written out of order: the index sorts them
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 5

# conftest's TINY without the domain detector (a trained CNN per dataset: too slow here, and
# eval.domain.enabled=false is a supported setting) and without the extra MobileNet detector, so
# Inception is the only detector. 32 cache images in 4 shards of 8 (2 per rank), 24 Inception
# samples in 6 gen_eval shards of 4 (3 per rank); 20 reference images (all of val/).
OVER = [o for o in TINY if not o.startswith(("eval.extra_detectors", "eval.domain."))] + [
    "device=cpu", "loss=kl", "dataset=imagenet", "dataset.resolution=32", f"dataset.num_classes={len(WNIDS)}",
    "dataset.workers=1", "tokenizer.norm_images=16", "tokenizer.batch_size=8",
    "generator.train_images=32", "generator.cache_shard_size=8",
    "eval.domain.enabled=false", "eval.extra_detectors=[]", "eval.n_ref=20", "eval.n_samples=24",
    "eval.kid_subset_size=16", "eval.batch_size=12", "eval.shard_size=4", "eval.save_npz=true",
    "eval.sampler.method=euler_maruyama"]
CACHE_SHARDS, EVAL_SHARDS = 4, 6
# Facts that describe how a run went, not what it computed: they may differ between equal runs.
RUN_FACTS = {"gen_eval_world_size", "peak_rss_mb_rank0", "latent_cache_world_size", "latent_cache_encode_s",
             "latent_cache_images_per_s", "latent_cache_shards_resumed"}


def build_tree(root: Path) -> Path:
    """train/<wnid>/ and val/<wnid>/: RGB, L and CMYK JPEGs and RGBA PNGs of 8 sizes (landscape,
    portrait, square, wider than twice the target), and one truncated JPEG in train/n03."""
    rng = np.random.default_rng(7)
    modes = [m for m in MODES if m != "P"]  # RGB, L, CMYK (JPEG), RGBA (PNG)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(WNIDS):
            for i in range(n):
                mode = modes[(i + c) % len(modes)]
                ext = ".png" if mode == "RGBA" else ".JPEG"
                _save(_image(rng, SIZES[(i + 3 * c) % len(SIZES)], mode), root / split / wnid / f"{wnid}_{i:03d}{ext}")
    good = (root / "train/n03/n03_000.JPEG").read_bytes()
    (root / "train/n03/n03_000b_truncated.JPEG").write_bytes(good[: len(good) // 3])
    return root


def _over(tree: Path, runs: Path) -> list[str]:
    return [*OVER, f"dataset.root={tree}", f"run_root={runs}"]


def _nodes(tree: Path, runs: Path) -> dict:
    _, cells = config.load(["grid=single", *_over(tree, runs)])
    return dag.build(cells, runs)[1][0]


def _args(stage: str, tree: Path, runs: Path) -> list[str]:
    return ["-m", "benchmark.run_stage", "--stage", stage, *_over(tree, runs)]


def _run2(stage: str, tree: Path, runs: Path, log: Path, **env: str) -> int:
    """2 processes under torchrun, output appended to ``log``: the exit status."""
    return launch(*_args(stage, tree, runs), extra_env=env, log=log, check=False).returncode


def _children(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc (torchrun's worker processes: they run in
    sessions of their own, so killing torchrun's process group would not reach them)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cache_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.name.startswith("shard_") or p.name in (lc.LABELS, lc.INDEX)}


def _facts(d: Path) -> dict:
    return {k: v for k, v in read_json(d / "record.json")["facts"].items() if k not in RUN_FACTS}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def whole(tree, tmp_path_factory, one_thread) -> tuple[Path, dict]:
    """The uninterrupted cell: every stage in dependency order through the real run_stage command
    line, in this process. Returns the run root and its nodes."""
    runs = tmp_path_factory.mktemp("whole")
    nodes = _nodes(tree, runs)
    with pytest.MonkeyPatch.context() as m:
        strip_launch_env(m)  # one process, even inside a SLURM job or under torchrun
        for st in ("reference", "fid_ref", "tokenizer", "latent_cache", "recon_eval", "generator", "gen_eval"):
            assert run_stage.main(["--stage", st, *_over(tree, runs)]) == 0, st
    assert set(nodes) == {"reference", "fid_ref", "tokenizer", "latent_cache", "recon_eval", "generator",
                          "gen_eval"}  # no domain_detector, no teacher (kl)
    return runs, nodes


@pytest.mark.slow
def test_whole_cell_outputs_and_bad_file_count(whole):
    _, nodes = whole
    for st, node in nodes.items():
        assert node.record_path.exists(), st
    tok = read_json(nodes["tokenizer"].record_path)["facts"]
    # 41 training files; 20 iterations of 8 = 4 epochs of 40 rows (one dropped per epoch, the order
    # reshuffled per epoch with a fixed seed), so the truncated file is decoded, counted once and
    # replaced by the next image of its class. 0 here would mean it was never read or not counted.
    assert tok["data_bad_images"] == 1
    assert tok["tokenizer_iters"] == 20 and tok["data_epochs"] == 4.0 and np.isfinite(tok["latent_scale"])
    assert (nodes["tokenizer"].dir / "tokenizer.pt").exists()
    cache = lc.LatentCache(nodes["latent_cache"].dir)
    assert cache.shape == (32, 4, 8, 8) and len(cache.shards) == CACHE_SHARDS
    assert sorted(set(cache.labels.tolist())) == [0, 1, 2, 3]
    gen = read_json(nodes["generator"].record_path)["facts"]
    assert gen["generator_hflip"] is True and gen["generator_train_latents"] == 32  # imagenet flips
    assert (nodes["generator"].dir / "ema.pt").exists()
    ev = nodes["gen_eval"].dir
    facts = read_json(ev / "record.json")["facts"]
    assert facts["n_samples"] == 24 and facts["shards"] == EVAL_SHARDS and facts["gen_eval_world_size"] == 1
    assert np.isfinite(facts["gfid"]) and np.isfinite(facts["kid"]) and "fd_domain" not in facts
    assert (ev / "samples.png").exists()
    with np.load(ev / shards.NPZ_NAME) as npz:
        x, y = npz["arr_0"], npz["arr_1"]
    assert x.shape == (24, 32, 32, 3) and x.dtype == np.uint8 and np.array_equal(y, np.arange(24) % 4)


@pytest.mark.slow  # 4 torchrun launches of 2 processes: most of this file's time
def test_killed_sharded_stages_resume_to_the_uninterrupted_bytes(whole, tree, tmp_path, monkeypatch, one_thread):
    _, a = whole
    strip_launch_env(monkeypatch)  # run_stage in this process must not see an enclosing job's launcher
    runs_b = tmp_path / "resumed"
    for st in ("reference", "fid_ref", "tokenizer"):  # the stages before the cache: taken from A
        shutil.copytree(a[st].dir, runs_b / "stages" / st / a[st].dir.name)
    b = _nodes(tree, runs_b)
    log = tmp_path / "torchrun.log"

    # latent_cache, 2 ranks: each SIGKILLs itself after its first shard (the stage's test hook;
    # torchrun then reports the failure). No index.json: the cache is unfinished.
    rc = _run2("latent_cache", tree, runs_b, log, **{lc.KILL_AFTER_ENV: "1"})
    d = b["latent_cache"].dir
    written = sorted(p.name for p in d.glob("shard_*.npy"))
    assert rc != 0 and 1 <= len(written) < CACHE_SHARDS, (rc, written, log.read_text()[-3000:])
    assert not (d / lc.INDEX).exists() and not (d / "record.json").exists()
    first = {n: (d / n).stat().st_mtime_ns for n in written}
    assert _run2("latent_cache", tree, runs_b, log) == 0, log.read_text()[-3000:]
    assert {n: (d / n).stat().st_mtime_ns for n in written} == first  # finished shards not rewritten
    facts = read_json(d / "record.json")["facts"]
    assert facts["latent_cache_shards_resumed"] == len(written) and facts["latent_cache_world_size"] == 2
    assert _cache_files(d) == _cache_files(a["latent_cache"].dir) and len(_cache_files(d)) == CACHE_SHARDS + 2
    assert _facts(d) == _facts(a["latent_cache"].dir)

    # The generator, from the resumed cache: the same weights as A's.
    assert run_stage.main(["--stage", "generator", *_over(tree, runs_b)]) == 0
    assert (b["generator"].dir / "ema.pt").read_bytes() == (a["generator"].dir / "ema.pt").read_bytes()

    # gen_eval, 2 ranks: the whole job (both workers, then torchrun) SIGKILLed as soon as one of
    # the 6 sample shards is on disk. gen_eval has no kill hook; a shard (4 samples through the
    # sampler, the decoder and Inception) takes a few tenths of a second here and each rank has 3,
    # so a poll every 20 ms catches the run midway.
    proc = launch_background(*_args("gen_eval", tree, runs_b), log=log)
    e = b["gen_eval"].dir
    deadline = time.monotonic() + 240
    while not list(e.glob(f"{shards.SHARD_DIR}/main_*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    for pid in _children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = {p.name: p.stat().st_mtime_ns for p in (e / shards.SHARD_DIR).glob("*.pt")}
    assert 1 <= len(left) < EVAL_SHARDS and not (e / "record.json").exists(), sorted(left)
    assert _run2("gen_eval", tree, runs_b, log) == 0, log.read_text()[-3000:]
    # The shards of the killed run were skipped, not drawn again (only rank 0 logs, so the files
    # tell it for both ranks).
    assert {n: (e / shards.SHARD_DIR / n).stat().st_mtime_ns for n in left} == left
    ea = a["gen_eval"].dir
    assert e.name == ea.name
    mine, theirs = _eval_files(e), _eval_files(ea)
    assert mine.keys() == theirs.keys() and len(mine) == EVAL_SHARDS + 1
    assert [k for k in mine if mine[k] != theirs[k]] == []  # images, labels, features, samples.npz
    assert read_json(e / "record.json")["facts"]["gen_eval_world_size"] == 2
    assert _facts(e) == _facts(ea)  # every metric, exactly
