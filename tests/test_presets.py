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
def test_generator_preset_epochs_match_steps(preset):
    _, (cell,) = config.load(["grid=single", f"generator={preset}"])
    g = cell.cfg["generator"]
    assert g["preset"] == preset and g["reproduces"].strip()
    assert g["model"] in GENERATORS
    assert _epochs(g) == pytest.approx(g["epochs"], rel=0.01), (preset, _epochs(g))


def _epochs(g: dict) -> float:
    return g["steps"] * g["batch_size"] / g["train_images"]


@pytest.mark.parametrize("grid", ["default", "pair", "mini-paper", "gen-length"])
def test_grid_generator_epochs_match_steps(grid):
    # mini-paper and gen-length set generator.steps and the documenting generator.epochs by hand
    # in their base overrides; the preset check above does not see those.
    _, cells = config.load([f"grid={grid}"])
    for cell in cells:
        g = cell.cfg["generator"]
        assert _epochs(g) == pytest.approx(g["epochs"], rel=0.01), (grid, cell.cfg["prior"]["name"], _epochs(g))


def test_paper_generator_is_lightningdit_xl1_64_epochs():
    _, (cell,) = config.load(["grid=single", "generator=paper-in256"])
    g = cell.cfg["generator"]
    assert (g["model"], g["model_args"]["patch_size"], g["batch_size"], g["epochs"]) == ("XL", 1, 1024, 64)
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
