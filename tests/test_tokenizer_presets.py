"""The tokenizer presets: the paper's ImageNet-256 recipe and the keys every preset carries."""
from pathlib import Path

import pytest

from benchmark import config
from tokenizers import latent_side

CONF = Path(config.__file__).parent / "conf" / "tokenizer"


def _tok(preset):
    # Validated against a dataset at the preset's resolution (paper-in256 decodes 256 px).
    res = ["dataset.resolution=256"] if preset.endswith("in256") else []
    _, (cell,) = config.load(["grid=single", f"tokenizer={preset}", *res])
    return cell.cfg["tokenizer"]


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_preset_has_precision_compile_and_loss_keys(preset):
    t = _tok(preset)
    assert t["precision"] in ("fp32", "bf16") and isinstance(t["compile"], bool)
    assert t["perceptual"] in ("mobilenet_v2", "lpips-vgg") and t["perceptual_weight"] >= 0
    assert {"weight", "start_step", "ndf", "n_layers", "diffaug"} <= set(t["gan"])


def test_cpu_tiny_keeps_perceptual_and_gan_off():
    t = _tok("cpu-tiny")  # the embedded default's 15-minute budget (bf16: 1.75x faster steps here)
    assert (t["perceptual_weight"], t["gan"]["weight"], t["precision"], t["compile"]) == (0.0, 0.0, "bf16", False)


def test_paper_in256_is_the_paper_recipe():
    t = _tok("paper-in256")
    assert t["preset"] == "paper-in256" and "DMVAE" in t["reproduces"]
    # The paper's DM stage is 350K steps; stage 1 and the decoder fine-tune are ours (50K each).
    assert (t["warmup_iters"], t["match_iters"], t["finetune_iters"]) == (50_000, 350_000, 50_000)
    assert t["warmup_frozen_encoder"] is True
    bb = t["encoder"]["backbone"]
    assert (t["encoder"]["name"], bb["model"], bb["patch_size"], bb["input_size"], bb["pretrained"]) == \
        ("backbone", "vit_large_patch14_dinov2.lvd142m", 16, 256, True)
    # latent 16 x 16 x 32 at 256 px with patch 16, decoded back by 8 (ch_mult) x 2 (input upsampling)
    assert (t["latent_channels"], latent_side(t, 256)) == (32, 16) and 256 // 16 == 16
    d = t["decoder"]
    assert (d["name"], d["ch"], list(d["ch_mult"]), d["num_res_blocks"], d["mid_attention"], d["upsample_input"]) \
        == ("flux", 128, [1, 2, 4, 4], 2, True, True)
    assert 2 ** (len(d["ch_mult"]) - 1) * 2 * latent_side(t, 256) == 256
    assert t["bottleneck_hidden"] == 2048
    assert (t["lr"], tuple(t["betas"]), t["weight_decay"], t["lr_warmup_steps"], t["grad_clip"]) == \
        (2e-5, (0.9, 0.95), 0.005, 1000, 1.0)
    assert (t["l1_weight"], t["perceptual"], t["perceptual_weight"], t["precision"]) == (1.0, "lpips-vgg", 1.0, "bf16")
    g = t["gan"]
    assert (g["weight"], g["start_step"], g["ndf"], g["n_layers"]) == (0.5, 5000, 64, 3) and "cutout" in g["diffaug"]


def test_latent_side_of_small_encoders():
    assert latent_side({"encoder": {"name": "conv", "mult": [1, 2, 2]}}, 32) == 8
    assert latent_side({"encoder": {"name": "vit", "patch_size": 4}}, 32) == 8
