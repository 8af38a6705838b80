"""Every model of grid=paper-table1 is built at its real size on the meta device (no weights,
no memory) and run once, so that shapes are checked end to end on a CPU machine: the tokenizer
(DINOv2-L or the prior's stage-1 backbone + MLP + FLUX decoder) maps 256 px images to the
16x16x32 latents and back, the LightningDiT-XL/1 generator and the dm teacher/fake keep the
latent shape, the PatchGAN scores 256 px images, and each feature prior's backbone gives a
feature grid equal to the latent grid (never upsampled features)."""
from __future__ import annotations

import pytest
import torch

from benchmark import config
from benchmark.dag import latent_shape
from benchmark.plan import _architecture_only


@pytest.fixture(scope="module")
def cells():
    _, cells = config.load(["grid=paper-table1"], missing=[])  # no ImageNet, no hub weights here
    return cells


def test_every_paper_cell_builds_at_real_shapes(cells):
    from backbones import build_backbone
    from benchmark.stages.common import build_score_net, build_tokenizer_for
    from benchmark.stages.generator import build_model
    from tokenizers.losses import PatchGAN

    assert len(cells) == 8
    for cell in cells:
        cfg = _architecture_only(cell.cfg)
        shape = latent_shape(cfg)
        assert shape == (32, 16, 16), cell.label
        t, y = torch.zeros(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta")
        with torch.device("meta"):
            x = torch.zeros(2, 3, 256, 256)
            tok = build_tokenizer_for(cfg)
            z = tok.encode(x)
            assert tuple(z.shape) == (2, *shape), cell.label
            assert tok.decode(z).shape == x.shape, cell.label
            gen = build_model(cfg)
            assert gen(z, t, y).shape == z.shape
            assert sum(p.numel() for p in gen.parameters()) == pytest.approx(675e6, rel=0.01)  # XL: 675M
            if cell.cfg["loss"]["name"] == "dm":
                assert build_score_net(cfg)(z, t, y).shape == z.shape
            gan = PatchGAN(3, **cfg["tokenizer"]["gan"])
            assert gan.logits(x).dim() == 4
            bb = cell.cfg["prior"].get("backbone")
            if bb and cell.cfg["prior"]["name"] == "features":
                bb = {**bb, "pretrained": False}
                bb.pop("checkpoint", None)
                grid = build_backbone(bb)(x).shape[-2:]
                assert tuple(grid) == shape[1:], f"{cell.label}: backbone grid {tuple(grid)} != latent grid"
