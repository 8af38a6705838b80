"""Resume after kill -9 of the stages that train one network: ``ssl_backbone`` (the offline MAE),
``reference`` (stage 1 of a feature prior) and ``teacher``.

Each test runs one stage with ``python -m benchmark.run_stage`` at tiny sizes and a checkpoint
interval far below its step count, kills a second run with SIGKILL once a checkpoint exists,
reruns it, and requires the rerun to say it resumed and to end with outputs bit-identical to an
uninterrupted run in another run root. The uninterrupted run and the rerun go in-process (one
thread, as the killed subprocess) to save a Python start-up each.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark import run_stage
from benchmark.store import load_torch
from _launch import clean_env

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 600  # generous: the machine is shared; the loop ends as soon as the checkpoint appears

# Small networks, many cheap steps: a checkpoint comes early and seconds of work remain after
# it, so the kill lands mid-training.
SSL = ["prior=offline-ssl", "prior.backbone.train.steps=200", "prior.backbone.train.batch_size=8",
       "prior.backbone.train.warmup_steps=5", "prior.backbone.train.checkpoint_every=10",
       "prior.backbone.arch.embed_dim=32", "prior.backbone.arch.depth=1", "prior.backbone.arch.num_heads=2",
       "prior.backbone.arch.decoder_dim=32", "prior.backbone.arch.decoder_heads=2"]
STAGE1 = ["prior=mobilenet", "prior.n_images=64", "prior.stage1.iters=60", "prior.stage1.batch_size=8",
          "prior.stage1.checkpoint_every=5", "tokenizer.decoder.ch=8"]
TEACHER = ["prior=gmm", "loss=dm", "loss.teacher=trained", "loss.teacher_steps=100",
           "loss.teacher_batch_size=16", "loss.teacher_checkpoint_every=5",
           "++loss.score_net_args.hidden_size=32", "++loss.score_net_args.depth=1",
           "++loss.score_net_args.num_heads=2"]


def _args(stage: str, overrides: list[str], root: Path) -> list[str]:
    return ["--stage", stage, "grid=single", "device=cpu", *overrides, f"run_root={root}"]


def _run_here(stage: str, overrides: list[str], root: Path) -> None:
    assert run_stage.main(_args(stage, overrides, root)) == 0


def _stage_dir(root: Path, stage: str) -> Path:
    (d,) = list((root / "stages" / stage).iterdir())
    return d


def _kill_after_checkpoint(stage: str, overrides: list[str], root: Path, ckpt: str, log: Path) -> None:
    """Start the stage in a subprocess and SIGKILL it as soon as ``ckpt`` exists in its directory."""
    env = clean_env()  # one thread, no launcher variables (tests/_launch.py)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "benchmark.run_stage", *_args(stage, overrides, root)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        try:
            while not list(root.glob(f"stages/{stage}/*/{ckpt}")):
                assert proc.poll() is None, f"{stage} ended before checkpointing:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{stage} wrote no {ckpt} in {WAIT_S} s"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not (_stage_dir(root, stage) / "record.json").exists(), f"{stage} finished before the kill"


def _assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs after resume"
        elif isinstance(a[k], dict):
            _assert_identical(a[k], b[k], f"{what}.{k}")


def _resume_matches(stage: str, overrides: list[str], tmp_path: Path, ckpt: str, output: str,
                    caplog, prepare=None) -> tuple[dict, dict]:
    """Uninterrupted run in root a; killed run then rerun in root b; returns both outputs."""
    a, b = tmp_path / "a", tmp_path / "b"
    _run_here(stage, overrides, a)
    if prepare is not None:
        prepare(a, b)
    _kill_after_checkpoint(stage, overrides, b, ckpt, tmp_path / "killed.log")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run_here(stage, overrides, b)
    assert "resuming from" in caplog.text, f"the rerun of {stage} did not resume from its checkpoint"
    assert not (_stage_dir(b, stage) / ckpt).exists()  # a finished stage leaves no checkpoint behind
    out_a, out_b = load_torch(_stage_dir(a, stage) / output), load_torch(_stage_dir(b, stage) / output)
    _assert_identical(out_a, out_b, f"{stage}/{output}")
    return out_a, out_b


@pytest.mark.slow
def test_ssl_backbone_resumes_bit_exact(tmp_path, caplog, one_thread):
    _resume_matches("ssl_backbone", SSL, tmp_path, "ckpt.pt", "backbone.pt", caplog)


@pytest.mark.slow
def test_reference_stage1_resumes_bit_exact(tmp_path, caplog, one_thread):
    # prior.pt holds the bank (the projected features: the MLP's output, trained through the
    # decoder) and the stage-1 final loss and train PSNR (the decoder's output).
    a, b = _resume_matches("reference", STAGE1, tmp_path, "stage1_ckpt.pt", "prior.pt", caplog)
    for k in ("stage1_final_loss", "stage1_train_psnr", "reference_latent_mean", "reference_latent_scale"):
        assert a["info"][k] == b["info"][k], k


@pytest.mark.slow
def test_teacher_resumes_bit_exact(tmp_path, caplog, one_thread):
    def share_reference(a: Path, b: Path) -> None:
        # The teacher's input: the finished gmm reference of root a (same key) serves root b.
        shutil.copytree(a / "stages" / "reference", b / "stages" / "reference")

    _run_here("reference", TEACHER, tmp_path / "a")
    _resume_matches("teacher", TEACHER, tmp_path, "ckpt.pt", "teacher.pt", caplog, prepare=share_reference)


def test_checkpoint_of_other_inputs_is_not_resumed(tmp_path, caplog):
    """Stage 1 recomputes its features on resume; a checkpoint written for other features (their
    SHA-256 is saved with it) must be discarded rather than resumed on the wrong inputs."""
    from benchmark.training import Checkpoint, train_steps

    def train(fingerprint: str) -> int:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        ckpt = Checkpoint(tmp_path / "ckpt.pt", every=2)
        start, _, _ = train_steps("toy", model, opt, None, g, ckpt, 3,
                                  lambda step: model(torch.randn(4, 2, generator=g)).pow(2).mean(),
                                  extra_state={"features_sha256": fingerprint})
        return start

    assert train("a") == 0 and (tmp_path / "ckpt.pt").exists()  # saved at step 2 of 3
    with caplog.at_level(logging.WARNING):
        assert train("b") == 0
    assert "starting over" in caplog.text
    assert train("b") == 2  # the run on "b" saved its own checkpoint, which does match
