"""Uncertainty and the domain-detector metrics of the eval stages.

- The bootstrap's fast exact FD (benchmark/metrics/bootstrap.py) equals torch-fidelity's FD on
  the same rows, in both of its routes, and its interval is the percentile interval of exactly
  those replicates.
- A tiny pipeline (TINY sizes, one kl cell) run stage by stage: fid_ref records the real-vs-real
  floors, recon_eval and gen_eval the domain metrics and intervals, gen_eval one FD per EMA
  snapshot (snapshot files written here from a tiny model), and turning the domain detector off
  leaves every Inception number exactly as it was.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from benchmark import config, dag
from benchmark.launch import run_node
from benchmark.metrics import feature_statistics, frechet_distance, to_uint8_rgb
from benchmark.metrics.bootstrap import FixedReferenceFD, fd_bootstrap
from benchmark.stages import domain_detector
from benchmark.stages.common import balanced_train_images
from benchmark.stages.gen_eval import snapshot_entries
from benchmark.stages.generator import build_model
from benchmark.store import load_torch, read_json, save_torch, write_json
from conftest import TINY


def _data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated, shifted features and reference statistics from another distribution."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    x = rng.standard_normal((n, d)) @ mix * 3 + 5
    ref = rng.standard_normal((4 * d, d)) @ (mix + 0.3 * np.eye(d)) * 2 + 4.5
    mu, sigma = feature_statistics(torch.from_numpy(ref))
    return x, mu, sigma


@pytest.mark.parametrize("n,d", [(60, 200), (300, 24), (50, 50)])  # sample space, feature space, square
def test_fixed_reference_fd_equals_frechet_distance(n, d):
    x, mu, sigma = _data(n, d, seed=n + d)
    fd = FixedReferenceFD(torch.from_numpy(x), mu, sigma)
    assert fd.sample_space == (n < d)
    want = frechet_distance(*feature_statistics(torch.from_numpy(x)), mu, sigma)
    assert fd() == pytest.approx(want, rel=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(3):  # resamples with repeated rows, as the bootstrap draws them
        idx = rng.integers(0, n, n)
        want = frechet_distance(*feature_statistics(torch.from_numpy(x[idx])), mu, sigma)
        assert fd(idx) == pytest.approx(want, rel=1e-6)


def test_bootstrap_is_the_bias_corrected_percentile_interval_of_seeded_resamples():
    x, mu, sigma = _data(80, 120, seed=1)
    iv = fd_bootstrap(x, mu, sigma, replicates=40, seed=7)
    # The same procedure written out with the reference FD.
    value = frechet_distance(*feature_statistics(torch.from_numpy(x)), mu, sigma)
    rng = np.random.default_rng(7)
    reps = np.array([frechet_distance(*feature_statistics(torch.from_numpy(x[rng.integers(0, 80, 80)])), mu, sigma)
                     for _ in range(40)])
    bias = reps.mean() - value
    lo, hi = np.percentile(reps, [2.5, 97.5])
    assert iv.value == pytest.approx(value, rel=1e-6) and iv.bias == pytest.approx(bias, rel=1e-5)
    assert (iv.lo, iv.hi) == (pytest.approx(lo - bias, rel=1e-5), pytest.approx(hi - bias, rel=1e-5))
    # Why the correction: resampling with replacement raises FD, so the plain percentile
    # interval misses the estimate; the corrected one brackets it.
    assert bias > 0 and lo > value and iv.lo < value < iv.hi
    assert iv.replicates == 40
    assert fd_bootstrap(x, mu, sigma, replicates=40, seed=7) == iv                # seeded
    assert fd_bootstrap(x, mu, sigma, replicates=40, seed=8).lo != iv.lo
    with pytest.raises(ValueError, match="at least 1 bootstrap replicate"):
        fd_bootstrap(x, mu, sigma, replicates=0, seed=0)


def test_interval_narrows_with_more_samples():
    x, mu, sigma = _data(800, 16, seed=3)
    wide = fd_bootstrap(x[:100], mu, sigma, replicates=100, seed=0)
    narrow = fd_bootstrap(x, mu, sigma, replicates=100, seed=0)
    assert (narrow.hi - narrow.lo) < 0.6 * (wide.hi - wide.lo)


def test_snapshot_entries_from_the_generator_record(tmp_path):
    node = dag.Node("generator", "generator-x", {}, {}, {"generator": {"steps": 40}}, tmp_path)
    node.dir.mkdir(parents=True)
    write_json(node.record_path, {"facts": {"generator_final_fm_loss": 1.0}})
    assert snapshot_entries(node) == []
    snaps = [{"fraction": 0.5, "step": 20, "file": "ema_050.pt"}, {"fraction": 0.25, "step": 10, "file": "ema_025.pt"}]
    write_json(node.record_path, {"facts": {"ema_snapshots": snaps}})
    assert [e["file"] for e in snapshot_entries(node)] == ["ema_025.pt", "ema_050.pt", "ema.pt"]
    assert snapshot_entries(node)[-1] == {"fraction": 1.0, "step": 40, "file": "ema.pt"}


# --------------------------------------------------------------------------------------------
# The eval stages at TINY size

OVER = TINY + ["grid=single", "loss=kl", "device=cpu", "eval.extra_detectors=[]"]  # MobileNet: not under test


def _nodes(root, *extra):
    _, cells = config.load(OVER + [f"run_root={root}", *extra])
    order, (nodes,) = dag.build(cells, root)
    return order, nodes


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    order, nodes = _nodes(root)
    for node in order:
        if node.stage != "gen_eval":
            run_node(node)
    gen = nodes["generator"]
    # EMA snapshots as the generator stage writes them: ema_050 the final weights themselves,
    # ema_025 a freshly initialised network.
    shutil.copy(gen.dir / "ema.pt", gen.dir / "ema_050.pt")
    torch.manual_seed(123)
    save_torch(gen.dir / "ema_025.pt", build_model(gen.cfg).state_dict())
    rec = read_json(gen.record_path)
    rec["facts"]["ema_snapshots"] = [{"fraction": 0.25, "step": 2, "file": "ema_025.pt"},
                                     {"fraction": 0.5, "step": 4, "file": "ema_050.pt"}]
    write_json(gen.record_path, rec)
    run_node(nodes["gen_eval"])
    return root, nodes


def _facts(node):
    return read_json(node.record_path)["facts"]


def test_fid_ref_records_real_vs_real_floors(pipeline):
    _, nodes = pipeline
    ref = nodes["fid_ref"]
    f = _facts(ref)
    for k in ("floor_gfid", "floor_kid", "floor_precision", "floor_recall", "floor_fd_domain", "floor_kid_domain",
              "floor_precision_domain", "floor_recall_domain", "floor_fd_snap_domain"):
        assert isinstance(f[k], float) and math.isfinite(f[k]), k
    assert f["floor_gfid"] > 0 and f["floor_fd_domain"] > 0
    assert f["floor_n"] == 20 and f["floor_n_domain"] == 30 and f["floor_n_snap_domain"] == 10
    assert f["n_ref_domain"] == 20 and f["detector_domain"].startswith("domain-cnn/w4-crop28/")
    dom = load_torch(ref.dir / "features_domain.pt")
    assert dom["pool"].shape == (20, 16) and len(dom["labels"]) == 20
    # The floor is what it says: class-balanced training images against the test reference.
    train = balanced_train_images(ref.cfg, 30)
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    assert torch.bincount(train.labels[:10], minlength=10).tolist() == [1] * 10  # every prefix balanced
    det = domain_detector.detector(nodes["domain_detector"], "bf16")
    feats = det.features(to_uint8_rgb(train.images))["pool"]
    stats = feature_statistics(dom["pool"])
    assert f["floor_fd_domain"] == pytest.approx(frechet_distance(*feature_statistics(feats), *stats), rel=1e-9)
    assert f["floor_fd_snap_domain"] == pytest.approx(frechet_distance(*feature_statistics(feats[:10]), *stats),
                                                      rel=1e-9)


def test_recon_eval_domain_fd_and_intervals(pipeline):
    _, nodes = pipeline
    f = _facts(nodes["recon_eval"])
    assert f["n_recon_domain"] == 20 and f["bootstrap_replicates"] == 10
    for name in ("rfid", "rfd_domain"):
        assert math.isfinite(f[name]) and f[name] > 0
        assert math.isfinite(f[f"{name}_lo"]) and f[f"{name}_lo"] <= f[f"{name}_hi"]
        assert f[f"{name}_boot_bias"] > 0  # resampling with replacement raises FD


def test_gen_eval_domain_metrics_intervals_and_snapshots(pipeline):
    _, nodes = pipeline
    f = _facts(nodes["gen_eval"])
    assert f["n_samples"] == 20 and f["n_samples_domain"] == 30
    for k in ("gfid", "fd_domain", "kid_domain", "precision_domain", "recall_domain", "gfid_lo", "gfid_hi",
              "gfid_boot_bias", "fd_domain_lo", "fd_domain_hi", "fd_domain_boot_bias"):
        assert isinstance(f[k], float) and math.isfinite(f[k]), k
    assert f["gfid_lo"] <= f["gfid_hi"] and f["fd_domain_lo"] <= f["fd_domain_hi"]
    assert 0 <= f["precision_domain"] <= 1 and 0 <= f["recall_domain"] <= 1
    assert f["detector_domain"] == _facts(nodes["fid_ref"])["detector_domain"]
    # One FD per snapshot plus the final EMA, each with its step.
    steps = nodes["generator"].cfg["generator"]["steps"]
    assert (f["snap025_step"], f["snap050_step"], f["snap100_step"]) == (2, 4, steps)
    assert f["snapshot_n_samples"] == 10
    # Same labels and noise for every snapshot: the same weights give the same FD exactly,
    # untrained weights another one.
    assert f["snap050_fd_domain"] == f["snap100_fd_domain"]
    assert f["snap025_fd_domain"] != f["snap100_fd_domain"]


def test_inception_numbers_do_not_depend_on_the_domain_detector(pipeline):
    root, on = pipeline
    order, off = _nodes(root, "eval.domain.enabled=false", "eval.bootstrap=0")
    assert "domain_detector" not in off and off["generator"].key == on["generator"].key
    for node in order:
        if not node.done():
            run_node(node)
    a, b = _facts(on["gen_eval"]), _facts(off["gen_eval"])
    for k in ("gfid", "kid", "kid_std", "precision", "recall", "decoded_out_of_range_frac"):
        assert a[k] == b[k], k
    assert "fd_domain" not in b and "gfid_lo" not in b and not any(k.startswith("snap") for k in b)
    ra, rb = _facts(on["recon_eval"]), _facts(off["recon_eval"])
    for k in ("rfid", "psnr", "ssim"):
        assert ra[k] == rb[k], k


def test_precision_recall_in_blocks_equal_the_whole_matrix_path():
    # The domain metrics use torch-fidelity's blockwise path (10,000 x 10,000 distances would
    # take 0.8 GB per matrix): the same numbers as its default path.
    from benchmark.metrics import generation_metrics
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(300, 8, generator=g) + 0.3, torch.randn(250, 8, generator=g)
    whole = generation_metrics({"pool": gen}, {"pool": ref}, kid_subset_size=100)
    blocks = generation_metrics({"pool": gen}, {"pool": ref}, kid_subset_size=100, prc_batch_size=64)
    assert (blocks["precision"], blocks["recall"]) == (whole["precision"], whole["recall"])
    assert 0 < whole["precision"] < 1 and 0 < whole["recall"] < 1
