"""benchmark/dag.py keying: which settings move which run directories, and the exact key formula.

A stage's directory is ``<stage>-<sha256(json{v, slice, deps})[:12]>``. A setting missing from
a slice silently reuses a stale directory for a different experiment; a setting wrongly in it
orphans finished runs. The sensitivity matrix below states, for each setting, exactly which
stages must get new keys, from the data flow in the README (not from dag.py's code).
"""
from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest

from benchmark import config, dag

ALL = {"domain_detector", "fid_ref", "reference", "teacher", "tokenizer", "recon_eval", "latent_cache", "generator",
       "gen_eval"}
DOWN_OF_TOKENIZER = {"tokenizer", "recon_eval", "latent_cache", "generator", "gen_eval"}
EVAL = {"fid_ref", "recon_eval", "gen_eval"}

BASE = ["grid=single", "loss.teacher=trained"]


def _keys(overrides, tmp_path):
    _, cells = config.load(overrides)
    _, (per_cell,) = dag.build(cells, tmp_path)
    return {stage: node.key for stage, node in per_cell.items()}


@pytest.fixture(scope="module")
def base_keys(tmp_path_factory):
    return _keys(BASE, tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("override,changed", [
    ("grid.seeds=[1]", DOWN_OF_TOKENIZER),  # the teacher models p_ref: loss.teacher_seed, shared by seeds
    ("loss.teacher_seed=1", {"teacher"} | DOWN_OF_TOKENIZER),
    # fid_ref measures the real-vs-real floors at every count; recon_eval follows its key.
    ("eval.n_samples=400", EVAL),
    ("eval.sampler.steps=8", {"gen_eval"}),
    ("eval.kid_subset_size=100", EVAL),
    ("eval.bootstrap=50", {"recon_eval", "gen_eval"}),
    ("eval.domain.n_samples=400", EVAL),
    ("eval.domain.snapshot_n_samples=400", EVAL),
    ("eval.domain.n_ref=400", EVAL),
    ("eval.domain.kid_subset_size=100", EVAL),
    ("eval.domain.width=8", {"domain_detector"} | EVAL),
    ("eval.domain.checkpoint_every=7", set()),     # a checkpoint interval: how often, not what
    ("eval.n_ref=400", EVAL),
    ("eval.precision=fp32", EVAL),
    ("eval.extra_detectors=[mobilenet_v2-imagenet]", EVAL),
    # eval.ref_npz must name a real file (tests/test_gen_eval_sharded.py checks its key)
    ("eval.save_npz=true", {"gen_eval"}),
    ("eval.shard_size=100", {"gen_eval"}),    # the shard is the sampler's batch: other samples
    ("+eval.labels=random", {"gen_eval"}),
    ("+eval.labels=null", set()),              # optional keys enter the hash only when set
    ("eval.batch_size=50", set()),             # how, not what
    ("generator.steps=100", {"generator", "gen_eval"}),
    # the cache holds generator.train_images latents in shards: both name its files
    ("generator.train_images=1000", {"latent_cache", "generator", "gen_eval"}),
    ("generator.cache_shard_size=500", {"latent_cache", "generator", "gen_eval"}),
    # flips are part of the data slice (benchmark.upstream.data_slice), so every stage moves; the
    # latent cache itself always holds both views, the generator's use of them is in its own key too
    ("dataset.hflip=true", ALL),
    ("generator.reproduces=prose", set()),     # documentation keys never enter a key
    ("tokenizer.lr=0.5", DOWN_OF_TOKENIZER),
    ("+tokenizer.description=prose", set()),
    ("loss.lambda=2", DOWN_OF_TOKENIZER),
    ("loss.teacher_steps=10", {"teacher"} | DOWN_OF_TOKENIZER),
    ("loss.teacher_lr=0.01", {"teacher"} | DOWN_OF_TOKENIZER),
    ("loss.teacher_batch_size=64", {"teacher"} | DOWN_OF_TOKENIZER),
    ("+loss.score_net_args.hidden_size=32", {"teacher"} | DOWN_OF_TOKENIZER),
    ("loss.teacher_checkpoint_every=50", set()),   # a checkpoint interval: how often, not what
])
def test_sensitivity(override, changed, base_keys, tmp_path):
    keys = _keys(BASE + [override], tmp_path)
    assert set(keys) == ALL
    assert {s for s in ALL if keys[s] != base_keys[s]} == changed


def test_num_classes_reaches_teacher_and_generator(base_keys, tmp_path):
    keys = _keys(BASE + ["dataset.num_classes=5"], tmp_path)
    moved = {s for s in ALL if keys[s] != base_keys[s]}
    assert {"teacher", "generator", "gen_eval"} <= moved and "fid_ref" not in moved


@pytest.mark.parametrize("override,changed", [
    ("prior.backbone.train.steps=10", {"ssl_backbone", "reference", "teacher"} | DOWN_OF_TOKENIZER),
    ("+prior.backbone.checkpoint=/x.pt", {"reference", "teacher"} | DOWN_OF_TOKENIZER),
    ("prior.backbone.train.checkpoint_every=7", set()),
    ("prior.stage1.checkpoint_every=7", set()),
    ("prior.stage1.iters=5", {"reference", "teacher"} | DOWN_OF_TOKENIZER),
    ("prior.label=renamed", set()),
    ("grid.seeds=[1]", DOWN_OF_TOKENIZER),  # the MAE, the bank and the teacher have their own seeds
])
def test_sensitivity_feature_prior(override, changed, tmp_path):
    base = ["grid=single", "prior=offline-ssl"]
    k0 = _keys(base, tmp_path)
    k1 = _keys(base + [override], tmp_path)
    stages = {"domain_detector", "fid_ref", "ssl_backbone", "reference", "teacher"} | DOWN_OF_TOKENIZER
    assert set(k0) == set(k1) == stages
    assert {s for s in stages if k0[s] != k1[s]} == changed


def _version(stage):
    """A stage kind's version (bumped when its outputs change meaning)."""
    if hasattr(dag, "STAGE_VERSION"):
        return dag.STAGE_VERSION[stage]
    from benchmark.upstream import STAGES
    return STAGES.get(stage).version


def _data_slice(cfg):
    if hasattr(dag, "_data_slice"):
        return dag._data_slice(cfg)
    from benchmark.upstream import data_slice
    return data_slice(cfg)


def _sha_key(stage, slc, deps):
    src = {"v": _version(stage), "slice": slc, "deps": deps}
    blob = json.dumps(src, sort_keys=True, separators=(",", ":"), default=str).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()[:12]}"


def test_fid_ref_and_generator_keys_by_hand(tmp_path):
    _, cells = config.load(["grid=single"])
    _, (n,) = dag.build(cells, tmp_path)
    c = cells[0].cfg
    ev = c["eval"]
    dom = ev["domain"]
    dd_slice = {"data": {"name": "fashion_mnist", "resolution": 32},
                "train": {k: dom[k] for k in ("width", "feature_dim", "steps", "batch_size", "lr", "weight_decay",
                                              "warmup_steps", "shift", "flip", "precision", "seed")}}
    assert n["domain_detector"].slice == dd_slice
    assert n["domain_detector"].key == _sha_key("domain_detector", dd_slice, {})
    fid_slice = {"data": {"name": "fashion_mnist", "resolution": 32}, "split": "test", "n": ev["n_ref"],
                 "detector": ev["detector"], "extra_detectors": ev["extra_detectors"], "precision": ev["precision"],
                 "floor": {"n": ev["n_samples"], "kid": ev["kid_subset_size"]},
                 "domain": {"n_ref": dom["n_ref"], "n": dom["n_samples"], "snapshot_n": dom["snapshot_n_samples"],
                            "kid": dom["kid_subset_size"]}}
    assert n["fid_ref"].slice == fid_slice
    assert n["fid_ref"].key == _sha_key("fid_ref", fid_slice, {"domain_detector": n["domain_detector"].key})
    # generator.precision=fp32, grad_accum, activation_checkpointing and compile stay out (dag.GENERATOR_HOW)
    gen = {k: v for k, v in c["generator"].items() if k not in ("reproduces", "description", "epochs", "label",
                                                                "precision", "grad_accum", "activation_checkpointing",
                                                                "compile")}
    gen_slice = {"generator": gen, "seed": 0, "num_classes": 10}
    assert n["generator"].slice == gen_slice
    lc_slice = {"train_images": c["generator"]["train_images"], "seed": 0, "shard_size": 10000}
    assert n["latent_cache"].slice == lc_slice
    assert n["latent_cache"].key == _sha_key("latent_cache", lc_slice, {"tokenizer": n["tokenizer"].key})
    assert n["generator"].key == _sha_key("generator", gen_slice, {"latent_cache": n["latent_cache"].key})
    # documentation keys and the compile switches (how, not what: dag.HOW_KEYS) stay out
    strip = lambda d: {k: v for k, v in d.items()  # noqa: E731
                       if k not in ("reproduces", "description", "epochs", "label", "compile")}
    assert n["tokenizer"].slice == {"data": {"name": "fashion_mnist", "resolution": 32},
                                    "tokenizer": strip(c["tokenizer"]), "prior": {"name": "gaussian"},
                                    "loss": {k: v for k, v in c["loss"].items()
                                             if k not in ("teacher_checkpoint_every", "compile")},
                                    "seed": 0}
    det = {"detector": ev["detector"], "extra_detectors": ev["extra_detectors"], "precision": ev["precision"]}
    boot = {"bootstrap": ev["bootstrap"]}
    assert n["recon_eval"].slice == {"n": ev["n_ref"], "kid": ev["kid_subset_size"], **det, **boot,
                                     "domain": {"n_ref": dom["n_ref"]}}
    assert n["gen_eval"].slice == {"n": ev["n_samples"], "sampler": ev["sampler"], "kid": ev["kid_subset_size"],
                                   "shard_size": ev["shard_size"], "seed": 0, **det, **boot,
                                   "domain": {"n": dom["n_samples"], "snapshot_n": dom["snapshot_n_samples"],
                                              "kid": dom["kid_subset_size"]}}
    assert n["reference"].slice == {"data": {"name": "fashion_mnist", "resolution": 32},
                                    "prior": {"name": "gaussian"}, "latent_shape": (4, 8, 8)}
    assert n["reference"].key == _sha_key("reference", {"data": {"name": "fashion_mnist", "resolution": 32},
                                                        "prior": {"name": "gaussian"}, "latent_shape": [4, 8, 8]}, {})


def test_dependency_roles_and_order(tmp_path):
    _, cells = config.load(BASE)
    order, (n,) = dag.build(cells, tmp_path)
    roles = {s: {r: d.stage for r, d in node.deps.items()} for s, node in n.items()}
    dd = {"domain_detector": "domain_detector"}
    assert roles == {"domain_detector": {}, "fid_ref": dd, "reference": {}, "teacher": {"reference": "reference"},
                     "tokenizer": {"reference": "reference", "teacher": "teacher"},
                     "recon_eval": {"tokenizer": "tokenizer", "fid_ref": "fid_ref", **dd},
                     "latent_cache": {"tokenizer": "tokenizer"},
                     "generator": {"latent_cache": "latent_cache"},
                     "gen_eval": {"generator": "generator", "tokenizer": "tokenizer", "fid_ref": "fid_ref", **dd}}
    pos = {node.key: i for i, node in enumerate(order)}
    assert len(order) == len(pos) == 9
    for node in order:
        assert all(pos[d.key] < pos[node.key] for d in node.deps.values())
    assert n["teacher"].slice["seed"] == 0 and n["teacher"].slice["num_classes"] == 10
    assert set(n["teacher"].slice) == {"score_net", "score_net_args", "teacher_steps", "teacher_batch_size",
                                       "teacher_lr", "teacher_plateau", "num_classes", "seed"}


def test_node_dedup_cells_and_paths(tmp_path):
    b = dag.DagBuilder(tmp_path)
    c1, c2 = SimpleNamespace(label="c1"), SimpleNamespace(label="c2")
    slc = {"a": 1, "description": "prose", "inner": [{"label": "x", "b": 2}]}
    n1 = b._node("fid_ref", {"cfg": 1}, slc, {}, c1)
    n2 = b._node("fid_ref", {"cfg": 2}, {"a": 1, "inner": [{"b": 2}]}, {}, c2)
    n3 = b._node("fid_ref", {}, {"a": 1, "inner": [{"b": 2}]}, {}, c1)
    assert n1 is n2 is n3 and n1.cells == ["c1", "c2"] and n1.cfg == {"cfg": 1}
    assert n1.slice == {"a": 1, "inner": [{"b": 2}]}
    assert n1.key == _sha_key("fid_ref", {"a": 1, "inner": [{"b": 2}]}, {})
    assert list(b.nodes) == [n1.key]
    dep = b._node("generator", {}, {"a": 1}, {"tokenizer": n1}, c1)
    assert dep.key == _sha_key("generator", {"a": 1}, {"tokenizer": n1.key}) and dep.deps == {"tokenizer": n1}
    assert n1.stage == "fid_ref" and n1.run_root == tmp_path
    assert n1.dir == tmp_path / "stages" / "fid_ref" / n1.key
    assert n1.record_path == n1.dir / "record.json" and not n1.done()
    n1.dir.mkdir(parents=True)
    n1.record_path.write_text("{}")
    assert n1.done()
    assert dag.DagBuilder(str(tmp_path)).run_root == tmp_path


def test_strip_docs_and_intervals():
    obj = {"reproduces": 1, "description": 2, "epochs": 3, "label": 4, "keep": {"label": 5, "x": [{"epochs": 1, "y": 2}]},
           "teacher_checkpoint_every": 9, "checkpoint_every": 7,
           "stage1": {"checkpoint_every": 1, "iters": 2}, "train": {"checkpoint_every": 1, "steps": 3},
           "other": {"checkpoint_every": 4}}
    assert dag._strip_docs(obj) == {"keep": {"x": [{"y": 2}]}, "checkpoint_every": 7, "stage1": {"iters": 2},
                                    "train": {"steps": 3}, "other": {"checkpoint_every": 4}}
    assert dag._strip_docs([1, "a"]) == [1, "a"] and dag._strip_docs(3) == 3
    assert dag.DOC_KEYS == {"reproduces", "description", "epochs", "label"}


def test_data_slice():
    cfg = {"dataset": {"name": "d", "resolution": 64, "channels": 3, "root": "/x"}}
    assert _data_slice(cfg) == {"name": "d", "resolution": 64}


def test_latent_shape():
    _, cells = config.load(["grid=single"])
    assert dag.latent_shape(cells[0].cfg) == (4, 8, 8)
    _, cells = config.load(["grid=single", "tokenizer.latent_channels=6"])
    assert dag.latent_shape(cells[0].cfg) == (6, 8, 8)


def test_needs_trained_teacher():
    if hasattr(dag, "needs_trained_teacher"):
        needs = dag.needs_trained_teacher
    else:  # the dm loss declares its teacher stage itself
        from priors.losses.dm import needs_trained_teacher as needs

    def cfg(prior, teacher=None):
        c = {"loss": {"name": "dm"}, "prior": {"name": prior}}
        if teacher is not None:
            c["loss"]["teacher"] = teacher
        return c
    assert needs(cfg("gaussian", "trained")) is True
    assert needs(cfg("gaussian")) is False          # default auto
    assert needs(cfg("features")) is True
    assert needs(cfg("features", "auto")) is True
    assert needs(cfg("gmm", "exact")) is False
    with pytest.raises(ValueError) as e:
        needs(cfg("subset", "exact"))
    assert str(e.value) == ("loss.teacher=exact but prior 'subset' has no closed-form score; "
                            "use loss.teacher=trained or auto")


def test_ssl_backbone_node_slice_roles_and_cfg(tmp_path):
    _, cells = config.load(["grid=single", "prior=offline-ssl", "+prior.backbone.checkpoint=/x.pt"])
    _, (n,) = dag.build(cells, tmp_path)
    c = cells[0].cfg
    bb = {k: v for k, v in c["prior"]["backbone"].items() if k != "checkpoint"}
    train = {k: v for k, v in bb["train"].items() if k not in ("checkpoint_every", "compile")}  # how, not what
    slc = {"data": {"name": "fashion_mnist", "resolution": 32}, "backbone": {**bb, "train": train}}
    assert n["ssl_backbone"].slice == slc
    assert n["ssl_backbone"].key == _sha_key("ssl_backbone", slc, {})
    assert n["reference"].deps == {"ssl_backbone": n["ssl_backbone"]}
    # every node carries the full config of the cell that created it (the stage reads it)
    assert all(node.cfg is c for node in n.values())


def test_gen_length_grid_measures_the_default_tokenizers(tmp_path):
    """grid=gen-length trains longer generators on the default sweep's own tokenizers: its first
    three cells share every key with grid=default's cells but the generator's and gen_eval's,
    so a finished default sweep is reused and the measurement is about generator length alone."""
    def per_cell(grid):
        _, cells = config.load([f"grid={grid}"])
        first = [c for c in cells if c.seed == 0]  # gen-length runs seeds 0-2, the default seed 0
        return [{s: n.key for s, n in m.items()} for m in dag.build(first, tmp_path)[1]]
    default, longer = per_cell("default"), per_cell("gen-length")
    assert len(longer) == len(default) + 2
    for d, g in zip(default, longer):
        assert {s for s in d if d[s] != g[s]} == {"generator", "gen_eval"}
