"""The latent_cache stage (benchmark/stages/latent_cache.py) at tiny sizes on Fashion-MNIST: what
it stores (encode_all's latents of the generator's images and of their flips, bit for bit), that
two gloo processes and a killed-then-rerun job write the same files as one uninterrupted process,
and that the generator trained from the memory-mapped cache equals the in-memory path it replaced.

The upstream reference and kl tokenizer (no teacher) are trained once per module and copied into
each test's run root; the stages run in-process with one thread (as the subprocesses), except the
torchrun and the killed runs.
"""
from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from _launch import launch, strip_launch_env
from benchmark import config, dag, run_stage
from benchmark.stages import latent_cache as lc
from benchmark.store import read_json

# kl: the tokenizer needs no teacher stage. 128 images: in shards of 32 (four shards) for the
# multi-process and resume runs, in one shard of 500 where the batches must be encode_all's.
TINY = ["grid=single", "device=cpu", "loss=kl", "tokenizer.warmup_iters=6", "tokenizer.match_iters=10",
        "tokenizer.finetune_iters=4", "tokenizer.batch_size=16", "tokenizer.checkpoint_every=5",
        "tokenizer.norm_images=64", "tokenizer.encoder.ch=8", "tokenizer.decoder.ch=8",
        "generator.steps=8", "generator.batch_size=16", "generator.train_images=128",
        "generator.checkpoint_every=4", "++generator.model_args.hidden_size=32", "++generator.model_args.depth=1",
        "++generator.model_args.num_heads=2"]


def _over(shard: int, root: Path) -> list[str]:
    return [*TINY, f"generator.cache_shard_size={shard}", f"run_root={root}"]


def _nodes(shard: int, root: Path) -> dict:
    _, cells = config.load(_over(shard, root))
    return dag.build(cells, root)[1][0]


def _run(stage: str, shard: int, root: Path) -> None:
    assert run_stage.main(["--stage", stage, *_over(shard, root)]) == 0


def _files(d: Path) -> dict[str, bytes]:
    """The cache's own files (shards, labels, index), by name."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.name.startswith("shard_") or p.name in (lc.LABELS, lc.INDEX)}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A run root with the finished reference and tokenizer (they do not depend on the shard size)."""
    root = tmp_path_factory.mktemp("upstream")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for stage in ("reference", "tokenizer"):
            _run(stage, 32, root)
    finally:
        torch.set_num_threads(n)
    return root


def _root(upstream: Path, dst: Path) -> Path:
    for stage in ("reference", "tokenizer"):
        shutil.copytree(upstream / "stages" / stage, dst / "stages" / stage)
    return dst


@pytest.fixture(scope="module")
def cache32(upstream, tmp_path_factory):
    """One uninterrupted process, shards of 32: the reference for the other runs."""
    root = _root(upstream, tmp_path_factory.mktemp("one"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run("latent_cache", 32, root)
    finally:
        torch.set_num_threads(n)
    return _nodes(32, root)["latent_cache"].dir


def _encode_all(upstream: Path, batch_size: int):
    """What the generator computed before the cache existed: encode_all over the subset, and the
    same for the flipped images; with the tokenizer's latent normalisation."""
    from benchmark.data import ImageSet, subset
    from benchmark.stages.common import dataset, load_tokenizer
    from tokenizers import encode_all
    nodes = _nodes(32, upstream)
    cfg = nodes["generator"].cfg
    tok, lnorm = load_tokenizer(nodes["tokenizer"])
    images = subset(dataset(cfg, "train"), 128, seed=int(cfg["seed"]))
    flipped = ImageSet(images.name, images.split, images.images.flip(-1), images.labels, images.class_names)
    return encode_all(tok, images, batch_size), encode_all(tok, flipped, batch_size), images.labels, lnorm


def test_cache_holds_encode_all_latents_and_flips(upstream, cache32, tmp_path, one_thread):
    # One shard of 500 >= 128 images: exactly encode_all's batches (its default of 500), so the
    # latents must be bit-identical to the in-memory path's.
    root = _root(upstream, tmp_path / "r")
    _run("latent_cache", 500, root)
    z, zf, labels, lnorm = _encode_all(upstream, 500)
    one = lc.LatentCache(_nodes(500, root)["latent_cache"].dir)
    rows = np.arange(128)
    assert len(one) == 128 and one.shape == (128, 4, 8, 8) and len(one.shards) == 1
    assert torch.equal(torch.from_numpy(one.raw(rows, np.zeros(128))), z)
    assert torch.equal(torch.from_numpy(one.raw(rows, np.ones(128))), zf)
    assert torch.equal(one.labels, labels)
    assert (one.norm.mean, one.norm.scale) == (lnorm.mean, lnorm.scale)
    # The generator's view: normalised rows in draw order, each from either view.
    idx = torch.randint(128, (50,), generator=torch.Generator().manual_seed(0))
    flip = torch.rand(50, generator=torch.Generator().manual_seed(1)) < 0.5
    want = torch.where(flip[:, None, None, None], lnorm.normalize(zf)[idx], lnorm.normalize(z)[idx])
    assert torch.equal(one.batch(idx), lnorm.normalize(z)[idx])
    assert torch.equal(one.batch(idx, flip), want)
    # Four shards of 32: rows gathered across shard boundaries in any order, equal to
    # encode_all with the same batches (the batches start at every shard).
    z32, zf32, _, _ = _encode_all(upstream, 32)
    four = lc.LatentCache(cache32)
    assert len(four.shards) == 4 and [s["count"] for s in four.index["shards"]] == [32] * 4
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(four.batch(perm), lnorm.normalize(z32)[perm])
    assert torch.equal(four.batch(perm, torch.ones(128, dtype=torch.bool)), lnorm.normalize(zf32)[perm])
    # The flip is a real mirror image: its latents differ from the image's.
    assert not torch.equal(z, zf)
    with pytest.raises(IndexError, match="outside"):
        four.raw(np.array([128]), np.array([0]))


@pytest.mark.slow  # torchrun start-up: ~20 s on the 2-core machine
def test_two_gloo_processes_write_the_same_files(upstream, cache32, tmp_path, monkeypatch):
    strip_launch_env(monkeypatch)
    root = _root(upstream, tmp_path / "two")
    launch("-m", "benchmark.run_stage", "--stage", "latent_cache", *_over(32, root))
    d = _nodes(32, root)["latent_cache"].dir
    assert d.name == cache32.name
    assert read_json(d / "record.json")["facts"]["latent_cache_world_size"] == 2
    assert _files(d) == _files(cache32) and len(_files(d)) == 6  # 4 shards, labels, index


def test_killed_run_resumes_from_its_finished_shards(upstream, cache32, tmp_path, caplog, one_thread):
    root = _root(upstream, tmp_path / "killed")
    log = tmp_path / "killed.log"
    proc = launch("-m", "benchmark.run_stage", "--stage", "latent_cache", *_over(32, root), nproc=1,
                  extra_env={lc.KILL_AFTER_ENV: "1"}, log=log, check=False)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    d = _nodes(32, root)["latent_cache"].dir
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".npy") == ["shard_00000.npy"]
    assert not (d / lc.INDEX).exists() and not (d / "record.json").exists()
    first = (d / "shard_00000.npy").stat()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run("latent_cache", 32, root)
    assert "1 of 4 shards already written" in caplog.text
    again = (d / "shard_00000.npy").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    assert read_json(d / "record.json")["facts"]["latent_cache_shards_resumed"] == 1
    assert _files(d) == _files(cache32)
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_generator_from_cache_matches_in_memory_training(upstream, tmp_path, one_thread):
    from benchmark.stages import generator
    root = _root(upstream, tmp_path / "gen")
    _run("latent_cache", 500, root)
    _run("generator", 500, root)
    node = _nodes(500, root)["generator"]
    facts = read_json(node.record_path)["facts"]
    assert facts["generator_hflip"] is False and facts["generator_train_latents"] == 128
    # The path before the cache: encode_all in memory, normalised, same seed before the model.
    z, _, labels, lnorm = _encode_all(upstream, 500)
    torch.manual_seed(int(node.cfg["seed"]) + 1)
    generator.train(node.cfg, lnorm.normalize(z), labels, tmp_path / "memory")
    cached = torch.load(node.dir / "ema.pt", weights_only=True)
    memory = torch.load(tmp_path / "memory" / "ema.pt", weights_only=True)
    assert cached.keys() == memory.keys()
    assert all(torch.equal(cached[k], memory[k]) for k in cached)
    # dataset.hflip: the same draws plus a flip each, so the run sees other latents than above.
    torch.manual_seed(int(node.cfg["seed"]) + 1)
    generator.train(node.cfg, lc.LatentCache(node.deps["latent_cache"].dir), labels, tmp_path / "flip", hflip=True)
    flipped = torch.load(tmp_path / "flip" / "ema.pt", weights_only=True)
    assert any(not torch.equal(cached[k], flipped[k]) for k in cached)


def test_flip_draws_leave_the_other_draws_unchanged():
    from benchmark.stages.generator import draw_batch, latent_rows, step_generator
    args = (128, 64, (4, 8, 8), "uniform", 0.1)
    plain = draw_batch(step_generator(0, 5, torch.device("cpu")), *args)
    flipped = draw_batch(step_generator(0, 5, torch.device("cpu")), *args, hflip=True)
    assert plain.flip is None
    for f in ("idx", "t", "eps", "drop"):
        assert torch.equal(getattr(plain, f), getattr(flipped, f)), f
    assert 10 < int(flipped.flip.sum()) < 54  # p = 1/2 over 64 draws
    part = flipped.part(1, 2)
    assert torch.equal(part.flip, flipped.flip[32:])
    with pytest.raises(ValueError, match="flipped views"):
        latent_rows(torch.zeros(128, 4, 8, 8), plain.idx, flipped.flip)


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="latent_cache stage has not finished"):
        lc.LatentCache(tmp_path)
    with pytest.raises(ValueError, match="cache_shard_size must be >= 1"):
        lc.shard_bounds(10, 0)
    assert lc.shard_bounds(70, 32) == [(0, 32), (32, 64), (64, 70)]


def test_difftraj_bank_comes_from_the_kl_cells_cache(cache32, tmp_path):
    from priors import PRIORS, FitContext
    cache = lc.LatentCache(cache32)
    prior = PRIORS.get("difftraj")(latent_shape=(4, 8, 8), n_images=48, t=0.5, seed=3)
    prior.fit(FitContext(dataset=None, seed=0, inputs={"base_latents": cache}, input_keys={"base_latents": "lc-1"}))
    rows = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:48].sort().values
    assert torch.equal(prior.bank, cache.batch(rows)) and torch.equal(prior.labels, cache.labels[rows])
    assert prior.info["base_latents"] == "lc-1" and prior.info["reference_bank_size"] == 48
    # The grid wires it: a difftraj cell's reference reads the kl cell's latent_cache node.
    _, cells = config.load(["grid=single", "prior=difftraj", f"run_root={tmp_path}"])
    (n,) = dag.build(cells, tmp_path)[1]
    ref_dep = n["reference"].deps["base_latents"]
    assert ref_dep.stage == "latent_cache" and ref_dep.deps["tokenizer"].slice["loss"]["name"] == "kl"
