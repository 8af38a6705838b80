"""A prior from a separately installed package (entry point), and one named in `plugins=`."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

PLUGIN = Path(__file__).parent / "plugins" / "dmvae_example_prior"


@pytest.fixture(scope="module")
def installed_plugin():
    """pip-install the example plugin package into this test environment."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(PLUGIN)]
    subprocess.run(cmd, check=True, capture_output=True)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "dmvae-example-prior"],
                   check=False, capture_output=True)


@pytest.mark.slow
def test_entry_point_plugin_runs_a_grid_cell(installed_plugin, tiny_overrides, tmp_path):
    # A fresh interpreter, as a user would run it: the entry point must be found by itself.
    over = [o for o in tiny_overrides] + ["grid=single", "prior.name=laplace", "+prior.scale=0.5",
                                          "loss.teacher_steps=4", "loss.teacher_batch_size=8"]
    proc = subprocess.run([sys.executable, "-m", "benchmark.grid", *over], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv,) = list((tmp_path / "runs" / "sweeps").glob("*/results.csv"))
    row = pd.read_csv(csv).iloc[0]
    assert row["prior"] == "laplace" and row["status"] == "done" and row["dm_teacher"] == "trained"
    assert list((tmp_path / "runs" / "stages" / "teacher").iterdir())


@pytest.mark.slow
def test_plugin_prior_with_a_stage_of_its_own(installed_plugin, tiny_overrides, tmp_path):
    """The example package's image-moments prior declares a stage kind of its own
    (example_image_moments, entry-point group dmvae_bench.stages) in ``upstream``; the grid runs
    it before the reference stage, once, and the prior fits from its output. Nothing in this
    repository names either."""
    over = [*tiny_overrides, "grid=single", "prior.name=image-moments", "+prior.n_images=256"]
    proc = subprocess.run([sys.executable, "-m", "benchmark.grid", *over], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    (moments,) = list((runs / "stages" / "example_image_moments").iterdir())
    facts = json.loads((moments / "record.json").read_text())["facts"]
    assert facts["moments_images"] == 256
    (ref,) = list((runs / "stages" / "reference").iterdir())
    assert json.loads((ref / "record.json").read_text())["deps"] == {"moments": moments.name}
    row = pd.read_csv(next(runs.glob("sweeps/*/results.csv"))).iloc[0]
    assert row["prior"] == "image-moments" and row["status"] == "done"
    # The cell's own upstream stage is part of its stage map (timed in the tables).
    assert row["wall_s_example_image_moments"] > 0
    # A misspelled key of the plug-in is refused before any stage, like a built-in's.
    bad = subprocess.run([sys.executable, "-m", "benchmark.grid", *over, "+prior.n_imagez=3",
                          f"run_root={tmp_path / 'bad'}"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert bad.returncode == 2 and "prior.n_imagez" in bad.stderr and "n_images" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_plugin_named_in_config_and_collisions(installed_plugin):
    from benchmark.registry import RegistryError
    from priors import PRIORS
    from benchmark import config
    _, (cell,) = config.load(["grid=single", "prior.name=laplace", "plugins=[dmvae_example_prior.laplace]"])
    assert cell.keys["prior"] == "laplace" and "laplace" in PRIORS
    with pytest.raises(RegistryError, match="registered twice") as e:
        PRIORS.register("laplace")(object)
    assert "gaussian" in str(e.value)


# A plugin module that only `plugins=[...]` can find: not installed, no entry point, importable
# through PYTHONPATH alone (a user's own module next to their sweep).
CONFIG_ONLY_PLUGIN = textwrap.dedent("""
    import torch
    from priors import PRIORS

    @PRIORS.register("uniform-from-config")
    class UniformPrior:
        class_conditional = False
        def __init__(self, latent_shape, half_width=1.5, **_):
            self.name, self.latent_shape, self.half_width = "uniform-from-config", tuple(latent_shape), float(half_width)
        def fit(self, ctx):
            return None
        def sample(self, n, generator=None, labels=None):
            return (2 * torch.rand(n, *self.latent_shape, generator=generator) - 1) * self.half_width
        def state_dict(self):
            return {"half_width": torch.tensor(self.half_width)}
        def load_state_dict(self, state):
            self.half_width = float(state["half_width"])
""")


@pytest.mark.slow
def test_plugin_named_only_in_config_runs_in_stage_workers(tiny_overrides, tmp_path):
    """`plugins=[module]` without any entry point: the grid process imports the module, and so
    must every process that runs a stage (the local launcher's spawned workers here; SLURM jobs
    go through the same run_node)."""
    (tmp_path / "my_cfg_prior.py").write_text(CONFIG_ONLY_PLUGIN)
    over = [*tiny_overrides, "grid=single", "prior.name=uniform-from-config", "plugins=[my_cfg_prior]",
            "loss.teacher_steps=4", "loss.teacher_batch_size=8", "launcher.workers=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmark.grid", *over], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv,) = list((tmp_path / "runs" / "sweeps").glob("*/results.csv"))
    row = pd.read_csv(csv).iloc[0]
    assert row["prior"] == "uniform-from-config" and row["status"] == "done", row.to_dict()
