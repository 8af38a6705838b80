"""The tokenizer stage with the perceptual and GAN terms, bf16 and the ViT/FLUX models: it
trains, records what it used, and resumes exactly (discriminator and its optimiser included)."""
from __future__ import annotations

import pytest
import torch

from benchmark import config, run_stage
from benchmark.store import read_json
from benchmark.training import Checkpoint

EXTRAS = ["tokenizer.perceptual_weight=0.5", "tokenizer.gan.weight=0.5", "tokenizer.gan.start_step=8",
          "tokenizer.gan.ndf=8", "tokenizer.gan.n_layers=2", "tokenizer.warmup_frozen_encoder=true"]


class Killed(BaseException):
    pass


def _run(over, root):
    # teacher: the dm fake's pre-trained start (loss.fake_init)
    for st in ("reference", "teacher", "tokenizer"):
        assert run_stage.main(["--stage", st, *over, f"run_root={root}"]) == 0


def test_gan_perceptual_stage_resumes_exactly(tiny_overrides, tmp_path, monkeypatch, one_thread):
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + EXTRAS
    _run(over, tmp_path / "a")
    (d,) = (tmp_path / "a").glob("stages/tokenizer/*")
    facts = read_json(d / "record.json")["facts"]
    assert (facts["perceptual"], facts["gan"], facts["gan_start_step"]) == ("mobilenet_v2", "patchgan-hinge", 8)
    logs = read_json(d / "final_logs.json")
    assert logs["gan_adaptive_w"] >= 0 and "gan_d" in logs and logs["perceptual"] > 0

    save = Checkpoint.save
    seen = []

    def save_then_die(self, step, **state):
        save(self, step, **state)
        seen.append(set(state))
        if step == 10:  # after the GAN started (step 8)
            raise Killed()

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            _run(over, tmp_path / "b")
    assert {"gan", "gan_opt"} <= seen[-1]
    _run(over, tmp_path / "b")
    a, b = (torch.load(next((tmp_path / r).glob("stages/tokenizer/*/tokenizer.pt")), weights_only=True)
            for r in "ab")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_bf16_vit_flux_stage(tiny_overrides, tmp_path, one_thread):
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + [
        "tokenizer.precision=bf16",
        # Whole sections replaced (~ then +): the conv keys of cpu-tiny are no ViT/FLUX settings.
        "~tokenizer.encoder", "+tokenizer.encoder={name: vit, patch_size: 4, dim: 16, depth: 1, num_heads: 2}",
        "~tokenizer.decoder", "+tokenizer.decoder={name: flux, ch: 8, ch_mult: [1, 2, 2]}"]
    _run(over, tmp_path)
    (d,) = tmp_path.glob("stages/tokenizer/*")
    facts = read_json(d / "record.json")["facts"]
    assert facts["tokenizer_precision"] == "bf16" and facts["latent_scale"] > 0
    state = torch.load(d / "tokenizer.pt", weights_only=True)
    assert any(k.startswith("encoder.blocks.0.attn") for k in state) and "decoder.conv_out.weight" in state
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_bad_precision_is_rejected(tiny_overrides, tmp_path):
    over = [o for o in tiny_overrides if not o.startswith("run_root")] + ["tokenizer.precision=fp16"]
    # Refused by the typed settings before any stage runs (it used to fail in the tokenizer stage).
    assert run_stage.main(["--stage", "tokenizer", *over, f"run_root={tmp_path}"]) == 2
    assert not list(tmp_path.glob("stages/*"))
    with pytest.raises(ValueError, match="fp32.*bf16"):
        config.load(["grid=single", *over])
