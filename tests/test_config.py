"""The hydra config tree, grid expansion and validation before any work starts."""
import pytest

from benchmark import config, dag
from benchmark.registry import RegistryError


def test_default_grid_has_dm_and_kl_cells():
    base, cells = config.load([])
    assert base["grid"]["name"] == "default"
    pairs = {(c.keys["prior"], c.keys["loss"]) for c in cells}
    assert pairs == {("gaussian", "dm"), ("offline-mae", "dm"), ("gaussian", "kl")}
    # the paper's lambda advice: 1 for synthetic priors, 10 for data-derived ones
    assert {c.keys["prior"]: c.keys["lambda"] for c in cells if c.keys["loss"] == "dm"} == {
        "gaussian": 1.0, "offline-mae": 10.0}
    assert all(c.keys["dataset"] == "fashion_mnist" for c in cells)
    # the grid compiles its DiTs (how, not what); the presets themselves stay eager
    assert all(c.cfg["generator"]["compile"] and c.cfg["eval"]["compile"] for c in cells)
    assert all(c.cfg["loss"]["compile"] for c in cells if c.keys["loss"] == "dm")


def test_command_line_overrides_win_over_cells():
    _, cells = config.load(["prior=gmm", "loss.lambda=3"])
    assert {c.keys["prior"] for c in cells} == {"gmm"}
    # the kl cell keeps its own loss group but the user's weight applies everywhere
    assert {c.keys["lambda"] for c in cells} == {3.0}
    # a group picked by the user drops the cells' settings for the group they replaced
    _, cells = config.load(["loss=kl"])
    assert {c.keys["lambda"] for c in cells} == {1e-3}


def test_seeds_multiply_cells():
    _, cells = config.load(["grid=single", "grid.seeds=[0,1,2]"])
    assert [c.seed for c in cells] == [0, 1, 2]


def test_unknown_prior_lists_known_ones():
    with pytest.raises(Exception) as e:
        config.load(["grid=single", "prior.name=nope"])
    assert "gaussian" in str(e.value) and "nope" in str(e.value)


def test_impossible_shapes_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        config.load(["grid=single", "dataset.resolution=30"])
    with pytest.raises(ValueError, match="patch size"):
        config.load(["grid=single", "generator.model_args.patch_size=3"])


def test_shared_stages_are_shared(tmp_path):
    _, cells = config.load(["grid=pair"])
    order, per_cell = dag.build(cells, tmp_path)
    assert per_cell[0]["reference"].key == per_cell[1]["reference"].key
    assert per_cell[0]["fid_ref"].key == per_cell[1]["fid_ref"].key
    assert per_cell[0]["tokenizer"].key != per_cell[1]["tokenizer"].key
    assert len({n.key for n in order}) == len(order)
    # the gaussian prior has an exact score: the dm cell's teacher stage only pre-trains the fake
    # (role fake_init); the exact score stays the teacher
    assert per_cell[0]["tokenizer"].deps["fake_init"].stage == "teacher" and "teacher" not in per_cell[0]["tokenizer"].deps
    _, cells = config.load(["grid=single", "loss.fake_init=random"])
    _, per_cell = dag.build(cells, tmp_path)
    assert "teacher" not in per_cell[0]
    _, cells = config.load(["grid=single", "loss.teacher=trained"])
    _, per_cell = dag.build(cells, tmp_path)
    assert "teacher" in per_cell[0] and "teacher" in per_cell[0]["tokenizer"].deps


def test_changing_upstream_config_changes_downstream_keys(tmp_path):
    _, a = config.load(["grid=single"])
    _, b = config.load(["grid=single", "tokenizer.lr=0.5"])
    (_, pa), (_, pb) = dag.build(a, tmp_path), dag.build(b, tmp_path)
    assert pa[0]["fid_ref"].key == pb[0]["fid_ref"].key
    assert pa[0]["gen_eval"].key != pb[0]["gen_eval"].key


def test_bad_plugin_module_is_reported():
    with pytest.raises(RegistryError, match="no_such_plugin_mod"):
        config.load(["grid=single", "plugins=[no_such_plugin_mod]"])


def test_unknown_detector_rejected():
    with pytest.raises(RegistryError, match="inception-v3-compat"):
        config.load(["grid=single", "eval.extra_detectors=[dinov2-nope]"])


def test_feature_and_difftraj_priors_share_upstream_stages(tmp_path):
    """One offline MAE for every cell that uses it; difftraj reuses the kl cell's latent cache."""
    overrides = [f"run_root={tmp_path}", "grid=single"]
    cells = []
    for p in ("offline-ssl", "subset-ssl", "difftraj"):
        cells += config.load(overrides + [f"prior={p}"])[1]
    cells += config.load(overrides + ["prior=gaussian", "loss=kl"])[1]
    order, per_cell = dag.build(cells, tmp_path)
    ssl = [n for n in order if n.stage == "ssl_backbone"]
    assert len(ssl) == 1 and per_cell[0]["ssl_backbone"] is per_cell[1]["ssl_backbone"]
    assert per_cell[0]["reference"].key != per_cell[1]["reference"].key
    diff_ref = per_cell[2]["reference"]
    assert diff_ref.deps["base_latents"] is per_cell[3]["latent_cache"]  # the kl cell's cached latents
    assert per_cell[3]["latent_cache"].deps["tokenizer"] is per_cell[3]["tokenizer"]
    pos = {n.key: i for i, n in enumerate(order)}
    assert pos[per_cell[3]["latent_cache"].key] < pos[diff_ref.key]
    assert pos[ssl[0].key] < pos[per_cell[0]["reference"].key]
    # The table shows the preset's label, not the generic class name.
    assert [c.keys["prior"] for c in cells] == ["offline-mae", "sub-offline-mae", "difftraj", "gaussian"]
