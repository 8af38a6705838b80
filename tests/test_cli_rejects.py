"""Bad configs through the real command line (`python -m benchmark.grid`): each is rejected
with exit code 2 and a message that says what is wrong, before any stage directory exists."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _launch import clean_env

ROOT = Path(__file__).resolve().parent.parent

# (id, overrides, words the error must contain)
BAD = [
    ("unknown-prior", ["prior.name=nope"], ["unknown prior 'nope'", "gaussian"]),
    ("unknown-generator-size", ["generator.model=Gigantic"], ["unknown generator 'Gigantic'", "XL"]),
    ("unknown-score-net-size", ["loss=dm", "loss.score_net=Huge"], ["unknown generator 'Huge'", "Tiny"]),
    ("plugin-fails-to-import", ["plugins=[no_such_plugin_module]"],
     ["plugin module 'no_such_plugin_module'", "failed to import"]),
    ("bad-teacher", ["loss=dm", "loss.teacher=magic"], ["loss.teacher must be auto, exact or trained", "magic"]),
    ("one-sample", ["eval.n_samples=1"], ["eval.n_samples and eval.n_ref must be at least 2"]),
    ("negative-lambda", ["loss.lambda=-1"], ["loss.lambda must be a finite number >= 0", "-1"]),
    ("unknown-detector", ["eval.detector=dinov2"], ["unknown detector 'dinov2'", "inception-v3-compat"]),
    ("misspelled-key", ["+loss.teacher_stepz=5"], ["`loss.teacher_stepz`", "did you mean `loss.teacher_steps`"]),
    ("bad-budget", ["+grid.budget={minutes: 15}"], ["grid.budget must be {minutes: <number>, workers: <int>}"]),
    ("preset-does-not-fit-dataset", ["tokenizer=paper-in256", "generator=paper-in256"],
     ["decodes to 256 px", "is 32 px", "tokenizer=paper-in256 does not fit"]),
]


@pytest.fixture(scope="module")
def rejected(tmp_path_factory):
    """Start every bad run at once (each is import-bound, a few seconds), then collect them."""
    env = clean_env()  # one thread, no launcher variables (tests/_launch.py)
    runs = {}
    for name, over, _ in BAD:
        root = tmp_path_factory.mktemp(name)
        proc = subprocess.Popen([sys.executable, "-m", "benchmark.grid", "grid=single", f"run_root={root}", *over],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[name] = (proc, root)
    out = {}
    for name, (proc, root) in runs.items():
        text = proc.communicate(timeout=900)[0]
        out[name] = (proc.returncode, text, root)
    return out


@pytest.mark.parametrize("name,over,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_rejected_by_the_cli_before_any_stage(rejected, name, over, words):
    code, text, root = rejected[name]
    assert code == 2, text[-2000:]
    assert "invalid configuration" in text, text[-2000:]
    for w in words:
        assert w in text, (w, text[-2000:])
    assert not (root / "stages").exists() and not (root / "sweeps").exists()
