"""Unit tests of the matching losses (issue: the dm loss exactly as in the paper)."""
import copy
import io

import pytest
import torch

from generators import build_generator
from priors import LOSSES, PRIORS, ExactTeacher
from tokenizers import build_tokenizer

SHAPE = (4, 4, 4)
NET = dict(patch_size=2, hidden_size=32, depth=1, num_heads=2)


def _teacher():
    torch.manual_seed(0)
    return build_generator("Tiny", input_size=4, in_channels=4, num_classes=3, **NET)


def _dm(teacher=None, **kw):
    return LOSSES.get("dm")(weight=1.0, teacher=teacher or _teacher(), latent_shape=SHAPE,
                            num_classes=3, score_net="Tiny", score_net_args=NET, **kw)


def test_dm_gradient_is_g_over_numel():
    loss_fn = _dm()
    with torch.no_grad():  # make fake differ from teacher so that g != 0
        for p in loss_fn.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(3, *SHAPE, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    g = loss_fn.direction(z, y)
    torch.manual_seed(5)
    loss, _ = loss_fn(z, y, step=0)
    loss.backward()
    assert g.abs().sum() > 0
    torch.testing.assert_close(z.grad, g / z.numel())


def test_dm_gradient_by_hand_with_exact_teacher():
    """Recompute g from the method's formula independently of DistributionMatching.direction."""
    prior = PRIORS.get("gaussian")(latent_shape=SHAPE)
    loss_fn = _dm(teacher=ExactTeacher(prior))
    z = torch.randn(2, *SHAPE, requires_grad=True)
    y = torch.tensor([0, 1])
    torch.manual_seed(9)
    t = torch.rand(2)  # sample_t("uniform") on [0, 1] draws torch.rand first
    eps = torch.randn(2, *SHAPE)
    torch.manual_seed(9)
    loss, _ = loss_fn(z, y, step=0)
    loss.backward()
    tb = t.view(2, 1, 1, 1)
    x_t = tb * z.detach() + (1 - tb) * eps
    loss_fn.fake.eval()
    with torch.no_grad():
        x_fake = x_t + (1 - tb) * loss_fn.fake(x_t, t, y)
    x_real = x_t + (1 - tb) * prior.velocity(x_t, t)
    norm = (z.detach() - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = (x_fake - x_real) / norm
    torch.testing.assert_close(z.grad, g / z.numel(), rtol=1e-4, atol=1e-7)


def test_fake_update_changes_only_fake():
    loss_fn = _dm()
    teacher_before = copy.deepcopy(loss_fn.teacher.state_dict())
    fake_before = copy.deepcopy(loss_fn.fake.state_dict())
    z = torch.randn(8, *SHAPE, requires_grad=True)
    loss_fn.update(z, torch.zeros(8, dtype=torch.long), step=0)
    assert z.grad is None
    for k, v in loss_fn.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    changed = [k for k, v in loss_fn.fake.state_dict().items() if not torch.equal(v, fake_before[k])]
    assert changed


def test_no_dm_gradient_reaches_decoder():
    cfg = {"encoder": {"name": "conv", "ch": 8, "mult": [1, 2]}, "decoder": {"name": "conv", "ch": 8, "mult": [1, 2]},
           "latent_channels": 4}
    tok = build_tokenizer(cfg, image_size=8, in_channels=1, stochastic=False)
    loss_fn = _dm()
    with torch.no_grad():
        for p in loss_fn.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = tok.encode(torch.rand(4, 1, 8, 8))
    loss, _ = loss_fn(z, torch.zeros(4, dtype=torch.long), step=0)
    loss.backward()
    assert all(p.grad is None for p in tok.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.encoder.parameters())
    assert all(p.grad is None for p in loss_fn.teacher.parameters())


def test_teacher_equal_to_fake_gives_zero_gradient():
    loss_fn = _dm()  # fake starts as an exact copy of the teacher
    z = torch.randn(4, *SHAPE, requires_grad=True)
    loss, _ = loss_fn(z, torch.tensor([0, 1, 2, 0]), step=0)
    loss.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_dm_state_dict_round_trip():
    a = _dm()
    a.update(torch.randn(4, *SHAPE), torch.zeros(4, dtype=torch.long), 0)
    b = _dm()
    # Through bytes, as a checkpoint goes: an in-memory round trip would alias a's optimiser
    # tensors into b (Optimizer.load_state_dict does not copy same-device tensors).
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "extra": a.extra_state()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    b.load_extra_state(saved["extra"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    # The fake's AdamW moments and step count must come back too: compare them, then take one
    # more identical step on both (AdamW's update depends on the moments, so a restore that
    # drops them diverges here even though the weights above were equal).
    sa, sb = a.fake_opt.state_dict(), b.fake_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert sa["state"]  # one update ran, so the moments exist
    for i, st in sa["state"].items():
        for name, t in st.items():
            assert torch.equal(t, sb["state"][i][name]), (i, name)
    z, y = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3)), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(7); a.update(z, y, 1)
    torch.manual_seed(7); b.update(z, y, 1)
    for (k, v), w in zip(a.fake.state_dict().items(), b.fake.state_dict().values()):
        assert torch.equal(v, w), k


def test_kl_matches_closed_form():
    kl = LOSSES.get("kl")(weight=1.0)
    mean, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    loss, _ = kl(mean, None, 0, posterior=(mean, logvar))
    expect = 0.5 * ((1 + 1 - 1 - 0) + (0 + torch.e ** 2 - 1 - 2)) / 2
    assert float(loss) == pytest.approx(float(expect), rel=1e-6)
    with pytest.raises(ValueError, match="posterior"):
        kl(mean, None, 0)


def test_bad_dm_settings_rejected():
    with pytest.raises(ValueError, match="t_range"):
        _dm(t_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="lambda"):
        LOSSES.get("none")(weight=-1.0)
