"""The numbers the README quotes about the default presets are read back from the composed
config, so that the two cannot drift apart again (they had: stage-1 iterations, MAE steps and
the paper tokenizer's DM length). A README edit that rewords a sentence must update its pattern
here; a preset change that is not carried into the README fails here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from benchmark import config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CONF = Path(config.__file__).parent / "conf"


def _cfg(*overrides: str) -> dict:
    _, (cell, *_) = config.load(["grid=single", *overrides])
    return cell.cfg


def _num(text: str) -> float:
    text = text.replace(",", "")
    if text.endswith("K"):
        return float(text[:-1]) * 1000
    return float(text)


def _quoted(pattern: str) -> tuple[float, ...]:
    """The numbers captured by ``pattern`` in the README (it must occur, once or more, with the
    same numbers every time)."""
    found = {tuple(_num(g) for g in m.groups()) for m in re.finditer(pattern, README)}
    assert found, f"README no longer says {pattern!r}: update the README or this test"
    assert len(found) == 1, f"README quotes {pattern!r} with different numbers: {found}"
    return found.pop()


def _mini_paper_override(key: str) -> float:
    cells = yaml.safe_load((CONF / "grid" / "mini-paper.yaml").read_text())["cells"]
    values = {o.split("=", 1)[1] for cell in cells for o in cell if o.startswith(f"{key}=")}
    assert len(values) == 1, values
    return float(values.pop())


def test_feature_prior_numbers():
    for prior in ("offline-ssl", "mobilenet"):
        p = _cfg(f"prior={prior}")["prior"]
        assert _quoted(r"`stage1\.iters`, ([\d,]+)\)") == (p["stage1"]["iters"],), prior
        assert _quoted(r"feature grid for `n_images` \(([\d,]+)\)") == (p["n_images"],), prior
    mae = _cfg("prior=offline-ssl")["prior"]["backbone"]
    steps, batch, mini = _quoted(r"trains it \(([\d,]+) steps of ([\d,]+) images in\s+the default, ([\d,]+) in `mini-paper`\)")
    assert (steps, batch) == (mae["train"]["steps"], mae["train"]["batch_size"])
    assert mini == _mini_paper_override("prior.backbone.train.steps")
    assert _quoted(r"\(([\d,]+) MAE steps\)") == (mae["train"]["steps"],)
    arch = mae["arch"]
    assert _quoted(r"\(patch (\d+), width (\d+), depth\s+(\d+)") == (arch["patch_size"], arch["embed_dim"], arch["depth"])


def test_default_grid_bank_size():
    cells = yaml.safe_load((CONF / "grid" / "default.yaml").read_text())["cells"]
    banks = {o.split("=", 1)[1] for cell in cells for o in cell if o.startswith("prior.n_images=")}
    assert banks == {"2048"}
    # the grid's own comment says so too (the MobileNetV2 cell that also quoted it left the default)
    assert re.search(r"A reference bank of 2,048 images", (CONF / "grid" / "default.yaml").read_text())


def test_tokenizer_presets():
    t = _cfg("tokenizer=cpu-tiny")["tokenizer"]
    quoted = _quoted(r"\| `cpu-tiny` \| conv ch (\d+), (\d+)x(\d+)x(\d+) latents, batch (\d+), "
                     r"(\d+) \+ (\d+) \+ (\d+) iterations")
    c, h, w = _latent(t)
    assert quoted == (t["encoder"]["ch"], c, h, w, t["batch_size"], t["warmup_iters"], t["match_iters"],
                      t["finetune_iters"])
    assert _quoted(r"tokenizer ([\d,]+) instead of [\d,]+ iterations") == \
        (t["warmup_iters"] + t["match_iters"] + t["finetune_iters"],)
    s = _cfg("tokenizer=cpu-small")["tokenizer"]
    assert _quoted(r"\| `cpu-small` \| conv ch (\d+), batch (\d+), (\d+) \+ (\d+) \+ (\d+) iterations") == \
        (s["encoder"]["ch"], s["batch_size"], s["warmup_iters"], s["match_iters"], s["finetune_iters"])
    p = _cfg("tokenizer=paper-in256", "dataset.resolution=256")["tokenizer"]
    assert _quoted(r"(\d+K) steps = (\d+K) frozen-encoder \+ (\d+K) DM \+ (\d+K) decoder fine-tune") == \
        (p["warmup_iters"] + p["match_iters"] + p["finetune_iters"], p["warmup_iters"], p["match_iters"],
         p["finetune_iters"])
    assert p["match_iters"] == 350_000  # DMVAE_METHOD.md: the DM stage is 350K steps


def _latent(t: dict) -> tuple[int, int, int]:
    from benchmark.dag import latent_shape
    return tuple(latent_shape(_cfg("tokenizer=" + t["preset"])))


def _default_cell(prior: str, loss: str) -> dict:
    """A cell of grid=default as it runs (the grid's base overrides applied)."""
    _, cells = config.load(["grid=default"])
    (cell,) = [c.cfg for c in cells if c.cfg["prior"]["name"] == prior and c.cfg["loss"]["name"] == loss]
    return cell


def test_generator_eval_and_loss_numbers():
    cfg = _cfg()
    g, ev, dm = cfg["generator"], cfg["eval"], cfg["loss"]
    default = _default_cell("gaussian", "dm")
    assert _quoted(r"normalised latents of ([\d,]+) training images") == (g["train_images"],)
    assert _quoted(r"generator ([\d,]+) instead of [\d,]+ steps") == (g["steps"],)
    assert _quoted(r"`gen_eval`: ([\d,]+) class-balanced samples \(Euler, (\d+) steps") == \
        (ev["domain"]["n_samples"], ev["sampler"]["steps"])
    assert _quoted(r"decoded; the first ([\d,]+)\s+scored with torch-fidelity") == (ev["n_samples"],)
    # the default sweep's cuts against the presets (grid=default's base), and the presets' values
    assert default["generator"]["snapshots"] == [] and "no EMA snapshots" in README
    assert _quoted(r"each EMA\s+snapshot on ([\d,]+) samples") == (ev["domain"]["snapshot_n_samples"],)
    assert tuple(100 * f for f in g["snapshots"]) == _quoted(r"EMA snapshots at (\d+)/(\d+)/(\d+)% of training")
    assert _quoted(r"teacher ceiling of ([\d,]+) steps \(the mini-paper: ([\d,]+)\)") == \
        (default["loss"]["teacher_steps"], dm["teacher_steps"])
    assert ev["sampler"]["method"] == "euler" and ev["sampler"]["cfg_scale"] == 1.0  # "no CFG"
    assert _quoted(r"`fid_ref`: Inception features of ([\d,]+) held-out") == (ev["n_ref"],)
    assert _quoted(r"teacher ([\d,]+) steps of ([\d,]+)\)") == (default["loss"]["teacher_steps"], dm["teacher_batch_size"])
    assert _quoted(r"`vae_train_every` \((\d+)\)") == (dm["vae_train_every"],)
    kl = _cfg("loss=kl")["loss"]
    assert _quoted(r"\| `kl` \|[^|]*\| lambda ([\d.e-]+) ") == (kl["lambda"],)
    gmm = _cfg("prior=gmm")["prior"]
    assert _quoted(r"\| `gmm` \| `gmm` \| GMM \| (\d+) isotropic components") == (gmm["num_components"],)


@pytest.mark.parametrize("prior", ["text"])
def test_text_prior_component_std(prior):
    from benchmark.config import _compose  # composing only: the text tower's weights are not needed
    p = _compose(["grid=single", f"prior={prior}"]).prior
    assert _quoted(r"one component \(std ([\d.]+)\) per caption") == (p.component_std,)


def test_grid_budgets():
    """The time targets the README quotes are the ones the grids state (benchmark.perf --sweep)."""
    budgets = {g: yaml.safe_load((CONF / "grid" / f"{g}.yaml").read_text())["budget"] for g in ("default", "mini-paper")}
    assert _quoted(r"\(`grid=default`: (\d+) minutes, `grid=mini-paper`: (\d+), both on (\d+) workers") == (
        budgets["default"]["minutes"], budgets["mini-paper"]["minutes"], budgets["default"]["workers"])
    assert budgets["default"]["workers"] == budgets["mini-paper"]["workers"]
