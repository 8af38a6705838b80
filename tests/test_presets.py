"""Presets are internally consistent and say what they reproduce."""
from pathlib import Path

import pytest
import torch

from benchmark import config, dag
from generators import GENERATORS

CONF = Path(config.__file__).parent / "conf"


def _names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("preset", _names("generator"))
def test_generator_preset_states_what_it_is(preset):
    _, (cell,) = config.load(["grid=single", f"generator={preset}"])
    g = cell.cfg["generator"]
    assert g["preset"] == preset and g["reproduces"].strip()
    assert g["model"] in GENERATORS
    assert g["epochs"] == pytest.approx(_epochs(g), abs=1e-4), (preset, g["epochs"])


def _epochs(g: dict) -> float:
    return g["steps"] * g["batch_size"] / g["train_images"]


@pytest.mark.parametrize("grid", ["default", "pair", "mini-paper", "gen-length", "dm-length"])
def test_grid_generator_epochs_follow_steps(grid):
    # mini-paper and gen-length change generator.steps in their base overrides: the epochs their
    # tables and figures show must be those steps', not the preset's.
    _, cells = config.load([f"grid={grid}"])
    for cell in cells:
        g = cell.cfg["generator"]
        assert g["epochs"] == pytest.approx(_epochs(g), abs=1e-4), (grid, cell.cfg["prior"]["name"], g["epochs"])
    if grid == "mini-paper":
        assert {cell.cfg["generator"]["epochs"] for cell in cells} == {15.36}


def test_epochs_follow_a_command_line_steps_override():
    _, (cell,) = config.load(["grid=single", "generator.steps=800"])
    assert cell.cfg["generator"]["epochs"] == 5.12  # 800 x 128 / 20,000


def test_stated_epochs_that_disagree_with_steps_are_refused():
    with pytest.raises(ValueError, match=r"generator.epochs=64 disagrees .* set generator.steps \(e.g. generator.steps=10000\)"):
        config.load(["grid=single", "+generator.epochs=64"])
    # a value that agrees (within 1%) is accepted and replaced by the derived one
    _, (cell,) = config.load(["grid=single", "+generator.epochs=2.55"])
    assert cell.cfg["generator"]["epochs"] == 2.56


def test_generator_sizes_must_be_positive():
    with pytest.raises(ValueError, match=r"generator.train_images must be positive, got 0"):
        config.load(["grid=single", "generator.train_images=0"])


def test_paper_generator_is_lightningdit_xl1_64_epochs():
    _, (cell,) = config.load(["grid=single", "generator=paper-in256"])
    g = cell.cfg["generator"]
    assert (g["model"], g["model_args"]["patch_size"], g["batch_size"], round(g["epochs"], 2)) == ("XL", 1, 1024, 64)
    assert (g["lr"], tuple(g["betas"]), g["ema_decay"], g["label_dropout"]) == (2e-4, (0.9, 0.95), 0.9999, 0.1)


@pytest.mark.parametrize("preset", _names("tokenizer"))
def test_tokenizer_preset_consistent(preset):
    # A preset is validated against a dataset at its resolution (paper-in256 decodes 256 px).
    res = ["dataset.resolution=256"] if preset.endswith("in256") else []
    _, (cell,) = config.load(["grid=single", f"tokenizer={preset}", *res])
    t = cell.cfg["tokenizer"]
    assert t["preset"] == preset and t["reproduces"].strip()
    c, h, w = dag.latent_shape(cell.cfg)
    assert h == w
    if t["encoder"]["name"] == "backbone":  # pretrained backbones: the grid is stated, not derived
        assert t["encoder"]["latent_grid"] == h
    else:  # the model built from the preset produces exactly the latent shape the DAG plans for
        from benchmark.stages.common import build_tokenizer_for
        tok = build_tokenizer_for(cell.cfg)
        x = torch.rand(1, cell.cfg["dataset"]["channels"], *(2 * [cell.cfg["dataset"]["resolution"]]))
        assert tuple(tok.encode(x).shape[1:]) == (c, h, w)
    assert t["checkpoint_every"] > 0 and t["warmup_iters"] + t["match_iters"] + t["finetune_iters"] > 0


def test_dm_length_grid_rows_and_shared_cells(tmp_path):
    """grid=dm-length: each phase length is a table row of its own (tokenizer.label), the label
    changes no stage key, and its 800-iteration cells are the mini-paper's seed-0 cells."""
    _, cells = config.load(["grid=dm-length"])
    rows = {(c.keys["prior"], c.keys["loss"], c.keys["tokenizer"]) for c in cells}
    assert len(rows) == len(cells) == 9
    assert {c.cfg["tokenizer"]["match_iters"] for c in cells} == {800, 2400, 4800}
    _, paper = config.load(["grid=mini-paper"])
    own = {n.key for n in dag.build(cells, tmp_path)[0]}
    shared = {n.key for n in dag.build([c for c in paper if c.seed == 0], tmp_path)[0]}
    base = [c for c in cells if c.cfg["tokenizer"]["match_iters"] == 800]
    assert {n.key for n in dag.build(base, tmp_path)[0]} <= shared
    labelled = [c for c in cells if c.cfg["tokenizer"].get("label")]
    unlabelled = [dict(c.cfg, tokenizer={k: v for k, v in c.cfg["tokenizer"].items() if k != "label"}) for c in labelled]
    assert {n.key for n in dag.build([config.Cell(u, 0) for u in unlabelled], tmp_path)[0]} <= own
