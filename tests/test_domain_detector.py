"""The domain_detector stage (benchmark/stages/domain_detector.py): a tiny classifier really
trained on Fashion-MNIST, its record, its features through the uint8 RGB Detector path, exact
resume from a checkpoint, its place in the DAG and its settings."""
from __future__ import annotations

import logging

import pytest
import torch

from benchmark import config, dag
from benchmark.launch import run_node
from benchmark.metrics import to_uint8_rgb
from benchmark.metrics.domain import DomainNet, centre_crop
from benchmark.settings import EvalSettings, SettingsError
from benchmark.stages import domain_detector as dd
from benchmark.stages.common import dataset
from benchmark.store import load_torch, read_json

# 60 steps of 32 images at width 4: seconds on one thread, far above chance (10 classes).
SMALL = ["grid=single", "loss=kl", "device=cpu", "eval.domain.width=4", "eval.domain.feature_dim=16",
         "eval.domain.steps=60", "eval.domain.batch_size=32", "eval.domain.warmup_steps=5",
         "eval.domain.checkpoint_every=20"]


def _node(overrides: list[str], root) -> dag.Node:
    _, cells = config.load(overrides + [f"run_root={root}"])
    _, (nodes,) = dag.build(cells, root)
    return nodes["domain_detector"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    node = _node(SMALL, tmp_path_factory.mktemp("runs"))
    run_node(node)
    return node


def test_trains_and_records_test_accuracy(trained):
    facts = read_json(trained.record_path)["facts"]
    assert facts["domain_n_test"] == 10000 and facts["domain_train_steps"] == 60
    assert 0.4 < facts["domain_test_accuracy"] <= 1.0  # chance is 0.1
    assert facts["domain_feature_dim"] == 16 and facts["domain_crop"] == 28
    assert facts["domain_in_channels"] == 1 and facts["domain_num_classes"] == 10
    assert not (trained.dir / "ckpt.pt").exists()  # removed once the weights are written
    # The recorded accuracy is the network's own on centre crops of the test split.
    net = dd.output(trained)
    assert isinstance(net, DomainNet) and not net.training
    test = dataset(trained.cfg, "test")
    assert net.side == 28 and dd.accuracy(net, test, "bf16") == facts["domain_test_accuracy"]


def test_detector_features_are_the_penultimate_layer_of_uint8_rgb_inputs(trained):
    net = dd.output(trained)
    images = dataset(trained.cfg, "test").images[:12]
    det = dd.detector(trained, "fp32")
    assert trained.key in det.version and det.version.endswith("/fp32") and not det.has_logits
    pool = det.features(to_uint8_rgb(images), batch_size=5)["pool"]
    assert pool.shape == (12, 16) and pool.dtype == torch.float64
    # RGB uint8 -> grey is exact: the same numbers as the network fed its training input.
    with torch.no_grad():
        direct = net.features(centre_crop(images.float() / 255, 28)).double()
    torch.testing.assert_close(pool, direct, rtol=1e-5, atol=1e-6)
    # Different images give different features (not a constant map).
    assert (pool[0] - pool[1]).abs().max() > 1e-3
    # bf16 features: close to fp32, not equal.
    bf = dd.detector(trained, "bf16").features(to_uint8_rgb(images))["pool"]
    assert not torch.equal(bf, pool) and (bf - pool).abs().max() < 0.1 * pool.abs().max()


def test_resume_after_checkpoint_gives_identical_weights(trained, tmp_path, monkeypatch, caplog, one_thread):
    node = _node(SMALL, tmp_path)
    real, calls = dd.augment, {"n": 0}

    def dies_at_step_30(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 31:
            raise KeyboardInterrupt("simulated kill after the step-20 checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(dd, "augment", dies_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        run_node(node)
    assert load_torch(node.dir / "ckpt.pt")["step"] == 20 and not node.done()
    monkeypatch.setattr(dd, "augment", real)
    caplog.set_level(logging.INFO)
    run_node(node)
    assert "resuming from" in caplog.text
    a, b = load_torch(trained.dir / dd.WEIGHTS), load_torch(node.dir / dd.WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(node.record_path)["facts"]["domain_test_accuracy"] == \
        read_json(trained.record_path)["facts"]["domain_test_accuracy"]


def test_batches_are_epoch_permutations_and_augment_crops_and_flips():
    n, bs = 50, 8
    rows = torch.cat([dd.batch_indices(n, bs, s, seed=3) for s in range(n // bs)])
    assert sorted(rows.tolist()) == sorted(set(rows.tolist())) and len(rows) == 48  # no repeats in an epoch
    assert not torch.equal(dd.batch_indices(n, bs, 0, 3), dd.batch_indices(n, bs, 6, 3))  # next epoch: new order
    assert torch.equal(dd.batch_indices(n, bs, 7, 3), dd.batch_indices(n, bs, 7, 3))
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = dd.augment(x, 4, False, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 4, 4)
    for i in range(2):  # each output is some 4x4 window of its own image
        windows = [x[i, :, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = dd.augment(x.repeat(64, 1, 1, 1), 6, True, torch.Generator().manual_seed(1))
    n_flipped = sum(torch.equal(f, x[0].flip(-1)) for f in flipped[::2])
    assert 16 < n_flipped < 48 and all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped[::2])


def test_one_shared_node_keyed_by_data_and_training_settings(tmp_path):
    _, cells = config.load(["grid=single", "grid.seeds=[0,1]", "loss=kl", f"run_root={tmp_path}"])
    _, per_cell = dag.build(cells, tmp_path)
    a, b = per_cell
    assert a["domain_detector"] is b["domain_detector"]  # not keyed by the cell seed
    assert a["gen_eval"].key != b["gen_eval"].key
    for stage in ("fid_ref", "recon_eval", "gen_eval"):
        assert a[stage].deps["domain_detector"] is a["domain_detector"]
    slc = a["domain_detector"].slice
    assert slc["data"] == {"name": "fashion_mnist", "resolution": 32} and "seed" not in slc
    assert set(slc["train"]) == {"width", "feature_dim", "steps", "batch_size", "lr", "weight_decay", "warmup_steps",
                                 "shift", "flip", "precision", "seed"}  # checkpoint_every: how often, not what

    def keys(*over):
        _, cs = config.load(["grid=single", "loss=kl", *over])
        _, (n,) = dag.build(cs, tmp_path)
        return n
    base = keys()
    assert keys("eval.domain.checkpoint_every=7")["domain_detector"].key == base["domain_detector"].key
    moved = keys("eval.domain.steps=7")
    assert all(moved[s].key != base[s].key for s in ("domain_detector", "fid_ref", "recon_eval", "gen_eval"))
    assert moved["tokenizer"].key == base["tokenizer"].key
    off = keys("eval.domain.enabled=false")
    assert "domain_detector" not in off and all("domain_detector" not in n.deps for n in off.values())


def test_unknown_or_bad_domain_key_is_refused():
    with pytest.raises(SettingsError, match=r"unknown key eval\.domain\.stpes .*did you mean eval\.domain\.steps"):
        EvalSettings.from_dict({"n_ref": 2, "n_samples": 2, "detector": "x", "precision": "fp32", "batch_size": 1,
                                "kid_subset_size": 2, "sampler": {"method": "euler", "steps": 1, "cfg_scale": 1,
                                                                  "time_shift": 1},
                                "domain": {"stpes": 3}}, "eval")
    with pytest.raises(ValueError, match=r"eval\.domain\.stpes"):
        config.load(["grid=single", "+eval.domain.stpes=3"])
    with pytest.raises(ValueError, match=r"eval\.domain: .*n_ref=1"):
        config.load(["grid=single", "eval.domain.n_ref=1"])
    with pytest.raises(ValueError, match=r"`eval\.domain\.flip` must be bool"):
        config.load(["grid=single", "eval.domain.flip=3"])
