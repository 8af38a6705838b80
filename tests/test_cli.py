"""The command line follows hydra's conventions: --help lists the config groups and flags,
--cfg job prints the resolved cells without running anything, comma sweeps expand into the
product grid with or without --multirun."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark import config, grid

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.grid", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_help_lists_groups_options_and_flags():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for group, option in (("prior", "offline-ssl"), ("loss", "[dm]"), ("tokenizer", "paper-in256"),
                          ("grid", "mini-paper"), ("launcher", "slurm"), ("dataset", "[fashion_mnist]")):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(group + " "))
        assert option in line.split(), (group, line)
    assert "--cfg job" in out and "--multirun" in out and "comma sweep" in out


def test_cfg_job_prints_every_cell_and_runs_nothing(tmp_path):
    proc = _cli("--cfg", "job", "grid=single", "prior=gaussian,gmm", f"run_root={tmp_path / 'runs'}", "-m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert [d["prior"]["name"] for d in docs] == ["gaussian", "gmm"]
    assert all(d["loss"]["name"] == "dm" and "tokenizer" in d for d in docs)
    assert not (tmp_path / "runs").exists()


def test_comma_sweeps_expand_into_the_product_grid():
    _, cells = config.load(["grid=single", "prior=gaussian,gmm", "loss.lambda=1,10"])
    assert [(c.cfg["prior"]["name"], c.cfg["loss"]["lambda"]) for c in cells] == \
        [("gaussian", 1), ("gaussian", 10), ("gmm", 1), ("gmm", 10)]
    # Applied to every cell of a grid preset: the pair grid (gaussian dm, gaussian kl) x 2 weights.
    _, pair = config.load(["grid=pair", "loss.lambda=1,10"])
    assert sorted((c.cfg["loss"]["name"], c.cfg["loss"]["lambda"]) for c in pair) == \
        [("dm", 1), ("dm", 10), ("kl", 1), ("kl", 10)]
    # Lists are values, not sweeps.
    _, seeds = config.load(["grid=single", "grid.seeds=[0,1]"])
    assert [c.seed for c in seeds] == [0, 1]


def test_sweeping_run_settings_or_intervals_is_rejected():
    with pytest.raises(ValueError, match="cannot be swept"):
        config.load(["grid=single", "run_root=/tmp/a,/tmp/b"])
    with pytest.raises(ValueError, match="comma sweeps"):
        config.load(["grid=single", "loss.lambda=interval(1,3)"])  # continuous: nothing to enumerate
    _, cells = config.load(["grid=single", "loss.lambda=range(1,3)"])  # discrete, as in hydra
    assert [c.cfg["loss"]["lambda"] for c in cells] == [1, 2]


def test_unknown_flag_is_an_error(caplog):
    assert grid.main(["--cgf", "job"]) == 2
    assert "unknown flag '--cgf'" in caplog.text


def test_optional_overrides_set_a_key_only_where_it_exists():
    """`?key=value` sizes a sweep of different plug-ins: the feature prior's bank changes, the
    Gaussian prior (which has no bank, so `prior.n_images=...` would be refused) is left alone,
    and a plain override of the same key wins."""
    _, cells = config.load(["grid=default", "?prior.n_images=512", "?loss.teacher_steps=7"])
    by_prior = {c.cfg["prior"]["name"] + "/" + c.cfg["loss"]["name"]: c.cfg for c in cells}
    assert by_prior["features/dm"]["prior"]["n_images"] == 512  # the grid cell's 2048 replaced
    assert "n_images" not in by_prior["gaussian/dm"]["prior"]
    assert by_prior["gaussian/dm"]["loss"]["teacher_steps"] == 7 and "teacher_steps" not in by_prior["gaussian/kl"]["loss"]
    _, (cell,) = config.load(["grid=single", "prior=offline-ssl", "?prior.n_images=512", "prior.n_images=256"])
    assert cell.cfg["prior"]["n_images"] == 256
    with pytest.raises(ValueError, match=r"\?key=value"):
        config.load(["grid=single", "?prior.n_images"])


def test_lambda_has_one_name_and_the_old_spelling_still_works(caplog):
    """loss.lambda in configs, `lambda` in records and tables; loss.weight=... still works."""
    _, (new,) = config.load(["grid=single", "loss.lambda=3"])
    _, (old,) = config.load(["grid=single", "loss.weight=3"])
    assert new.cfg == old.cfg and new.cfg["loss"]["lambda"] == 3 and "weight" not in new.cfg["loss"]
    assert "loss.weight is now loss.lambda" in caplog.text
    assert new.keys["lambda"] == 3
    from priors import LOSSES
    from priors.base import ExactTeacher
    from priors.analytic import GaussianPrior
    prior = GaussianPrior((4, 8, 8))
    dm = LOSSES.get("dm").from_config({k: v for k, v in new.cfg["loss"].items() if k != "name"}, inputs={},
                                      latent_shape=(4, 8, 8), num_classes=10, prior=prior,
                                      tokenizer_optim={"lr": 1e-3})  # the runner passes it (fake_lr: null)
    assert dm.weight == 3 and dm.describe()["lambda"] == 3 and isinstance(dm.teacher, ExactTeacher)
