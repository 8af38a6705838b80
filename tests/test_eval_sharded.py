"""Data-parallel recon_eval and fid_ref (benchmark/stages/recon_eval.py, fid_ref.py and
distributed.sharded_batches): two gloo processes write the same files and the same metrics as one, one
process computes what the code before sharding computed, and the batch-to-rank assignment gives
every batch back to rank 0 in order for uneven counts.

The upstream stages (domain detector, tokenizer) are finished once and copied. eval.batch_size=8
cuts the 20 held-out images into batches of 8, 8 and 4 (rank 0 scores two, rank 1 one), and the
16 images of reconstructions.png come from both ranks. Every run uses one intra-op thread (the
torchrun processes through OMP_NUM_THREADS, this process through the one_thread fixture): PSNR and
SSIM sums move in their last bits with the thread count, which is not what is tested here."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from _launch import launch
from benchmark import config, dag
from benchmark.launch import run_node
from benchmark.metrics import build_detector, generation_metrics, psnr, ssim
from benchmark.metrics.columns import fd, fd_interval_columns
from benchmark.metrics.generation import feature_statistics
from benchmark.metrics.streaming import FeatureStream, index_batches
from benchmark.settings import EvalSettings
from benchmark.stages import domain_detector, fid_ref, recon_eval
from benchmark.stages.common import (balanced_train_images, detector_features, domain_ref_images, eval_images,
                                     features_file, image_grid, load_tokenizer)
from benchmark.store import load_torch, read_json
from conftest import TINY

OVER = [*TINY, "loss=none", "eval.batch_size=8"]
STAGES = ("fid_ref", "recon_eval")
# Not outputs: the record (wall time, world size), logs, attempts, and config.yaml (it names run_root).
NOT_OUTPUTS = {"record.json", "stage.log", "attempts.json", "config.yaml"}
TIMES: dict[str, float] = {}


def _build(root: Path) -> tuple[list[dag.Node], dict[str, dag.Node]]:
    """The cell's nodes in execution order, and by stage."""
    _, cells = config.load(["grid=single", *OVER, f"run_root={root}"])
    order, per_cell = dag.build(cells, root)
    return order, per_cell[0]


def _nodes(root: Path) -> dict[str, dag.Node]:
    return _build(root)[1]


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name not in NOT_OUTPUTS}


def _facts(d: Path) -> dict:
    return read_json(d / "record.json")["facts"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """Every stage recon_eval and fid_ref depend on (not themselves), finished once."""
    root = tmp_path_factory.mktemp("upstream")
    order, nodes = _build(root)
    needed, todo = set(), [nodes["recon_eval"]]
    while todo:
        for dep in todo.pop().deps.values():
            if dep.stage not in STAGES and dep.dir not in needed:
                needed.add(dep.dir)
                todo.append(dep)
    for node in order:
        if node.dir in needed:
            run_node(node)
    return root


def _copy(upstream: Path, dst: Path) -> Path:
    shutil.copytree(upstream / "stages", dst / "stages")
    return dst


@pytest.fixture(scope="module")
def one_process(upstream, tmp_path_factory, one_thread) -> Path:
    """fid_ref then recon_eval in this process (no process group), as the grid runs them."""
    root = _copy(upstream, tmp_path_factory.mktemp("one"))
    nodes = _nodes(root)
    for stage in STAGES:
        t0 = time.perf_counter()
        run_node(nodes[stage])
        TIMES[f"{stage} 1 process"] = time.perf_counter() - t0
    return root


def test_two_processes_write_what_one_process_writes(one_process, upstream, tmp_path):
    two = _copy(upstream, tmp_path / "two")
    for stage in STAGES:
        t0 = time.perf_counter()
        launch("-m", "benchmark.run_stage", "--stage", stage, *OVER, f"run_root={two}")
        TIMES[f"{stage} 2 processes (torchrun, with start-up)"] = time.perf_counter() - t0
    print({k: round(v, 1) for k, v in TIMES.items()})
    mine, theirs = _nodes(one_process), _nodes(two)
    for stage in STAGES:
        a, b = mine[stage].dir, theirs[stage].dir
        assert a.name == b.name  # one config, one stage directory
        files = _outputs(a)
        assert [k for k in files if files[k] != _outputs(b).get(k)] == [], stage  # byte for byte
        assert _outputs(b).keys() == files.keys()
        assert _facts(b) == _facts(a), stage  # every metric, exactly
        assert read_json(b / "record.json")["world_size"] == 2
    assert {"features.pt", "features_mobilenet_v2-imagenet.pt", "features_domain.pt"} <= _outputs(
        mine["fid_ref"].dir).keys()
    assert "reconstructions.png" in _outputs(mine["recon_eval"].dir)
    facts = _facts(mine["recon_eval"].dir)
    assert facts["n_recon"] == 20 and {"psnr", "ssim", "rfid", "rfid_lo", "rfd_mobilenet_v2", "rfd_domain"} <= facts.keys()


def test_one_process_computes_what_the_unsharded_code_did(one_process, one_thread, tmp_path):
    """The features, floors and recon metrics of the sharded code on one process, against the
    code before sharding run here inline: detector_features over the whole set (fid_ref) and the
    single loop over batches of recon_eval's old reconstruct_scored. Exact equality."""
    nodes = _nodes(one_process)
    ref_node, rec_node = nodes["fid_ref"], nodes["recon_eval"]
    ev = EvalSettings.from_dict(ref_node.cfg["eval"], "eval")
    bs, images = ev.batch_size, eval_images(ref_node.cfg)
    ref_facts, rec_facts = _facts(ref_node.dir), _facts(rec_node.dir)

    # fid_ref: every detector's reference features, and the Inception floor.
    dets = {name: build_detector(name, ev.precision) for name in (ev.detector, *ev.extra_detectors)}
    old = {name: detector_features(det, images, bs) for name, det in dets.items()}
    for i, name in enumerate(dets):
        saved = load_torch(ref_node.dir / features_file(name, primary=i == 0))
        assert torch.equal(saved["pool"], old[name]["pool"]) and saved["logits"] is old[name]["logits"] is None
        assert torch.equal(saved["labels"], images.labels)
    train = detector_features(dets[ev.detector], balanced_train_images(ref_node.cfg, ev.n_samples), bs)
    m = generation_metrics(train, old[ev.detector], seed=fid_ref.FLOOR_SEED, kid_subset_size=ev.kid_subset_size)
    assert (ref_facts["floor_gfid"], ref_facts["floor_kid"], ref_facts["floor_precision"],
            ref_facts["floor_recall"]) == (m["fid"], m["kid_mean"], m["precision"], m["recall"])
    dom = domain_detector.detector(ref_node.deps["domain_detector"], ev.precision)
    dom_images = domain_ref_images(ref_node.cfg)
    dom_ref = detector_features(dom, dom_images, bs)["pool"]
    assert torch.equal(load_torch(ref_node.dir / fid_ref.DOMAIN_FEATURES)["pool"], dom_ref)
    d = ev.domain
    dom_train = detector_features(dom, balanced_train_images(ref_node.cfg, max(d.n_samples, d.snapshot_n_samples)),
                                  bs)["pool"]
    assert ref_facts["floor_fd_domain"] == fd(dom_train[:d.n_samples], feature_statistics(dom_ref))
    assert ref_facts["floor_fd_snap_domain"] == fd(dom_train[:d.snapshot_n_samples], feature_statistics(dom_ref))

    # recon_eval: the loop it ran before it was sharded, batch after batch in one process.
    tok, _ = load_tokenizer(rec_node.deps["tokenizer"])

    @torch.no_grad()
    def old_reconstruct_scored(images_, dets_, keep=0):
        stream, ps, ss, first = FeatureStream(dets_, bs), [], [], []
        for idx in index_batches(len(images_), bs):
            x = images_.float_batch(idx)
            r = tok(x).clamp(0, 1)
            ps.append(psnr(r, x))
            ss.append(ssim(r, x))
            stream.add(r)
            if sum(len(f) for f in first) < keep:
                first.append(r[:keep])
        return stream, torch.cat(ps), torch.cat(ss), torch.cat(first)[:keep] if first else None

    stream, ps, ss, first = old_reconstruct_scored(images, dets, keep=recon_eval.GRID)
    assert (rec_facts["psnr"], rec_facts["ssim"]) == (float(ps.mean()), float(ss.mean()))
    ref = load_torch(ref_node.dir / "features.pt")
    assert rec_facts["rfid"] == generation_metrics(stream.result(ev.detector), ref,
                                                   kid_subset_size=ev.kid_subset_size)["fid"]
    seed = int(rec_node.cfg["seed"]) + recon_eval.BOOTSTRAP_OFFSET
    boot = fd_interval_columns("rfid", stream.result(ev.detector)["pool"], feature_statistics(ref["pool"]),
                               ev.bootstrap, seed)
    assert {k: rec_facts[k] for k in boot} == boot
    mob = "mobilenet_v2-imagenet"
    assert rec_facts["rfd_mobilenet_v2"] == fd(stream.result(mob)["pool"], feature_statistics(
        load_torch(ref_node.dir / features_file(mob, primary=False))["pool"]))
    image_grid(torch.cat([images.float_batch(torch.arange(len(first))), first]), recon_eval.GRID,
               tmp_path / "old.png")
    assert (tmp_path / "old.png").read_bytes() == (rec_node.dir / "reconstructions.png").read_bytes()
    dstream, _, _, _ = old_reconstruct_scored(dom_images, {"domain": dom})
    assert rec_facts["rfd_domain"] == fd(dstream.result("domain")["pool"], feature_statistics(dom_ref))


# Each rank of a 2-process gloo group runs sharded_batches over several (n, batch size) pairs
# (an odd number of batches, a short last batch, a single batch: fewer batches than ranks) and
# writes which batches it worked on and what it was given back.
SCRIPT = """
import json, sys
import torch
from benchmark import distributed
from benchmark.distributed import sharded_batches
info = distributed.init_from_env("cpu")
out = {}
for n, bs in ((20, 8), (7, 1), (5, 5), (3, 2), (10, 3)):
    worked = []
    def work(idx):
        worked.append(int(idx[0]))
        return {"rows": idx.clone(), "rank": info.rank}
    got = [(g["rows"].tolist(), g["rank"]) for g in sharded_batches(n, bs, work, info)]
    out[f"{n},{bs}"] = {"worked": worked, "got": got}
# As run_stage does: no rank tears the group down while the other may still be using it (a CI run
# once saw rank 0 abort in gloo's teardown, "terminate called without an active exception").
distributed.finish()
json.dump(out, open(sys.argv[1] + f"/rank{info.rank}.json", "w"))
"""


def test_batches_go_round_robin_and_come_back_in_order(tmp_path):
    script = tmp_path / "shard_check.py"
    script.write_text(SCRIPT)
    launch(str(script), str(tmp_path), timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for key in ranks[0]:
        n, bs = map(int, key.split(","))
        batches = [b.tolist() for b in index_batches(n, bs)]
        # Batch i on rank i mod 2, the batches of one process whatever the world size.
        for r in range(2):
            assert ranks[r][key]["worked"] == [b[0] for b in batches[r::2]], (key, r)
        assert ranks[0][key]["got"] == [[b, i % 2] for i, b in enumerate(batches)], key
        assert ranks[1][key]["got"] == [], key
