"""The dm loss (priors/losses/dm.py) against hand computations with toy score networks.

The toy networks are affine in x, so every quantity of the method (t in t_range, x_t, the
guided velocities, the clean-data estimates, the per-sample normalisation, g, the loss and its
gradient, the fake network's flow-matching loss and its first AdamW step) is recomputed here
from the formulas in the module docstring, not from DistributionMatching's own code.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from priors import LOSSES

SHAPE = (2, 3, 3)
NUM_CLASSES = 3


class Toy(nn.Module):
    """v = a x + b[y] + t (+100 in training mode, like label dropout: must not be used to score)."""

    def __init__(self, a=0.5, b=(0.1, -0.2, 0.3, 0.05)):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float32))
        self.null_label = NUM_CLASSES

    def forward(self, x, t, y):
        v = self.a * x + self.b[y].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)
        return v + 100.0 if self.training else v

    def hand(self, x, t, y):
        return float(self.a.detach()) * x + self.b.detach()[y].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


class ToClean(nn.Module):
    """v = -x / (1 - t) + c: the clean-data estimate x_t + (1 - t) v is exactly (1 - t) c."""

    def __init__(self, c=0.0):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.null_label = NUM_CLASSES

    def forward(self, x, t, y):
        tb = t.view(-1, 1, 1, 1)
        return -x / (1 - tb) + self.c


def _dm(teacher, **kw):
    return LOSSES.get("dm")(weight=1.0, teacher=teacher, latent_shape=SHAPE, num_classes=NUM_CLASSES, **kw)


def _fake_params(loss_fn, a, b):
    with torch.no_grad():
        loss_fn.fake.a.fill_(a)
        loss_fn.fake.b.copy_(torch.tensor(b))


def _hand_direction(teacher, fake, z, y, seed, t_range, cfg):
    torch.manual_seed(seed)
    u = torch.rand(z.shape[0])               # sample_t("uniform") draws u first,
    eps = torch.randn(z.shape)               # then interpolate's noise
    t = t_range[0] + (t_range[1] - t_range[0]) * u
    tb = t.view(-1, 1, 1, 1)
    x_t = tb * z + (1 - tb) * eps

    def guided(net):
        v_c = net.hand(x_t, t, y)
        v_u = net.hand(x_t, t, torch.full_like(y, NUM_CLASSES))
        return v_c + (cfg - 1.0) * (v_c - v_u)

    x_fake = x_t + (1 - tb) * guided(fake)
    x_real = x_t + (1 - tb) * guided(teacher)
    norm = (z - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    return (x_fake - x_real) / norm


@pytest.mark.parametrize("t_range,cfg", [((0.0, 1.0), 1.0), ((0.25, 0.75), 1.0), ((0.1, 0.9), 2.5)])
@pytest.mark.parametrize("fake_training", [True, False])
def test_direction_by_hand(t_range, cfg, fake_training):
    loss_fn = _dm(Toy(), t_range=list(t_range), cfg_scale=cfg)
    _fake_params(loss_fn, 0.8, (0.0, 0.4, -0.1, 0.2))
    loss_fn.fake.train(fake_training)
    z = torch.randn(4, *SHAPE)
    y = torch.tensor([0, 1, 2, 1])
    torch.manual_seed(11)
    g = loss_fn.direction(z, y)
    assert loss_fn.fake.training is fake_training  # scoring mode switched back
    assert loss_fn.teacher.training is False
    expected = _hand_direction(loss_fn.teacher, loss_fn.fake, z, y, 11, t_range, cfg)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    assert not g.requires_grad


def test_direction_per_sample_normalisation_scales_with_each_sample():
    # g of a sample does not depend on the other samples of the batch (norm is per sample)
    loss_fn = _dm(Toy())
    _fake_params(loss_fn, 0.9, (0.3, 0.3, 0.3, 0.3))
    z = torch.randn(3, *SHAPE)
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(2)
    g = loss_fn.direction(z, y)
    expected = _hand_direction(loss_fn.teacher, loss_fn.fake, z, y, 2, (0.0, 1.0), 1.0)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    per_sample_mean = g.abs().mean(dim=(1, 2, 3))
    assert not torch.allclose(per_sample_mean, per_sample_mean[0].expand(3))


@pytest.mark.parametrize("c_fake,what", [(1.0, "+inf"), (-1.0, "-inf"), (0.0, "nan")])
def test_degenerate_normalisation_gives_zero_not_nan(c_fake, what):
    # z == 0 and the teacher's estimate is exactly 0: norm == 0, so g is +-inf or 0/0 = nan,
    # which must become 0 rather than poison the tokenizer's gradient
    loss_fn = _dm(ToClean(0.0))
    with torch.no_grad():
        loss_fn.fake.c.fill_(c_fake)
    z = torch.zeros(2, *SHAPE)
    y = torch.tensor([0, 1])
    raw = (torch.tensor(c_fake) / torch.tensor(0.0)).item()
    assert {"+inf": raw == math.inf, "-inf": raw == -math.inf, "nan": math.isnan(raw)}[what]
    g = loss_fn.direction(z, y)
    assert torch.equal(g, torch.zeros_like(z))


def test_forward_loss_metrics_and_gradient(monkeypatch):
    loss_fn = _dm(Toy())
    g = torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1).expand(3, *SHAPE).contiguous()
    monkeypatch.setattr(loss_fn, "direction", lambda z, labels: g)
    z = torch.randn(3, *SHAPE, requires_grad=True)
    loss, info = loss_fn(z, torch.tensor([0, 1, 2]), step=0)
    # 0.5 * mean(g^2) = 0.5 * (4 + 1 + 0.25) / 3
    assert loss.item() == pytest.approx(0.875)
    assert info["dm"] == pytest.approx(0.875)
    assert info["dm_grad_norm"] == pytest.approx(math.sqrt(5.25 / 3))  # rms of g
    assert set(info) == {"dm", "dm_grad_norm"}
    loss.backward()
    torch.testing.assert_close(z.grad, g / z.numel())


def test_init_validation():
    for bad in [(0.5, 0.5), (-0.01, 0.5), (0.5, 1.01), (0.6, 0.5)]:
        with pytest.raises(ValueError, match=r"dm t_range must satisfy 0 <= t0 < t1 <= 1, got"):
            _dm(Toy(), t_range=bad)
    for ok in [(0.0, 1.0), (0.0, 0.01), (0.99, 1.0)]:
        assert _dm(Toy(), t_range=ok).t_range == ok
    with pytest.raises(ValueError, match=r"dm vae_train_every must be >= 1, got 0"):
        _dm(Toy(), vae_train_every=0)
    assert _dm(Toy(), vae_train_every=1).tokenizer_every == 1


def test_init_attributes_and_fake_copy():
    teacher = Toy()
    loss_fn = _dm(teacher, t_range=[0, 1], cfg_scale=3, vae_train_every=4.0, fake_lr=1e-3,
                  fake_betas=[0.8, 0.9], fake_weight_decay=0.1, teacher_kind="exact")
    assert loss_fn.t_range == (0.0, 1.0) and isinstance(loss_fn.t_range[0], float)
    assert loss_fn.cfg_scale == 3.0 and isinstance(loss_fn.cfg_scale, float)
    assert loss_fn.tokenizer_every == 4 and isinstance(loss_fn.tokenizer_every, int)
    assert loss_fn.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert loss_fn.fake is not teacher and loss_fn.fake.training
    assert all(p.requires_grad for p in loss_fn.fake.parameters())
    for p, q in zip(loss_fn.fake.parameters(), teacher.parameters()):
        assert torch.equal(p, q) and p is not q
    (group,) = loss_fn.fake_opt.param_groups
    assert isinstance(loss_fn.fake_opt, torch.optim.AdamW)
    assert group["lr"] == 1e-3 and group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in loss_fn.fake.parameters()}
    assert loss_fn.describe() == {"lambda": 1.0, "dm_teacher": "exact", "dm_cfg": 3.0, "dm_fake_init": "teacher",
                                  "dm_fake_lr": 1e-3, "dm_t_range": [0.0, 1.0], "dm_vae_train_every": 4}


def test_defaults():
    loss_fn = _dm(Toy())
    assert loss_fn.t_range == (0.0, 1.0) and loss_fn.cfg_scale == 1.0 and loss_fn.tokenizer_every == 5
    (group,) = loss_fn.fake_opt.param_groups
    assert group["lr"] == 2e-4 and group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.005
    assert loss_fn.describe()["dm_teacher"] == "trained"


class _NoParams(nn.Module):
    null_label = NUM_CLASSES

    def forward(self, x, t, y):
        return torch.zeros_like(x)


def test_parameterless_teacher_gets_a_fresh_score_network():
    from generators import build_generator
    args = dict(patch_size=1, hidden_size=16, depth=1, num_heads=2)
    loss_fn = _dm(_NoParams(), score_net="Tiny", score_net_args=args)
    ref = build_generator("Tiny", input_size=3, in_channels=2, num_classes=NUM_CLASSES, **args)
    assert type(loss_fn.fake) is type(ref)
    assert [p.shape for p in loss_fn.fake.parameters()] == [p.shape for p in ref.parameters()]
    assert loss_fn.fake.null_label == NUM_CLASSES
    out = loss_fn.fake(torch.randn(2, *SHAPE), torch.rand(2), torch.tensor([0, 1]))
    assert out.shape == (2, *SHAPE)


def test_update_is_one_flow_matching_step_of_the_fake():
    loss_fn = _dm(Toy(), fake_lr=0.01, fake_weight_decay=0.1)
    loss_fn.fake.eval()  # update must switch to training mode itself
    a0, b0 = float(loss_fn.fake.a), loss_fn.fake.b.detach().clone()
    z = torch.randn(4, *SHAPE, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    # hand: flow_matching_loss draws eps then t; the fake in training mode adds 100
    torch.manual_seed(3)
    eps = torch.randn(z.shape)
    t = torch.rand(4)
    tb = t.view(-1, 1, 1, 1)
    x_t = tb * z.detach() + (1 - tb) * eps
    a = torch.tensor(a0, requires_grad=True)
    b = b0.clone().requires_grad_(True)
    v = a * x_t + b[y].view(-1, 1, 1, 1) + tb + 100.0
    hand_loss = ((v - (z.detach() - eps)) ** 2).mean()
    hand_loss.backward()
    torch.manual_seed(3)
    info = loss_fn.update(z, y, step=0)
    assert info == {"fake_fm": pytest.approx(hand_loss.item(), rel=1e-6)}
    assert loss_fn.fake.training and z.grad is None
    # first AdamW step: p <- p (1 - lr wd) - lr sign(grad)   (bias-corrected m / sqrt(v) = sign)
    assert float(loss_fn.fake.a) == pytest.approx(a0 * (1 - 0.001) - 0.01 * math.copysign(1, a.grad), abs=1e-6)
    exp_b = b0 * (1 - 0.001) - 0.01 * torch.sign(b.grad)
    torch.testing.assert_close(loss_fn.fake.b.detach(), exp_b, atol=1e-6, rtol=0)
    # the teacher is untouched
    assert float(loss_fn.teacher.a) == 0.5
    # a second update starts from zeroed gradients (no accumulation)
    a1, b1 = float(loss_fn.fake.a), tuple(loss_fn.fake.b.detach().tolist())
    torch.manual_seed(4)
    loss_fn.update(z, y, step=1)
    torch.manual_seed(4)
    eps, t = torch.randn(z.shape), torch.rand(4)
    tb = t.view(-1, 1, 1, 1)
    x_t = tb * z.detach() + (1 - tb) * eps
    fake_copy = Toy(a1, b1)
    fake_copy.train()
    loss = ((fake_copy(x_t, t, y) - (z.detach() - eps)) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(loss_fn.fake.a.grad, fake_copy.a.grad, rtol=1e-5, atol=1e-6)


def test_extra_state_round_trip():
    a = _dm(Toy(), fake_lr=0.01)
    z, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 0])
    a.update(z, y, 0)
    state = a.extra_state()
    assert set(state) == {"fake_opt", "fake_sched"}
    b = _dm(Toy(), fake_lr=0.01)
    b.load_extra_state(state)
    assert b.fake_sched.last_epoch == a.fake_sched.last_epoch == 1
    sa, sb = a.fake_opt.state_dict(), b.fake_opt.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])


def test_constructor_defaults_weight_and_score_net():
    loss_fn = LOSSES.get("dm")(teacher=_NoParams(), latent_shape=SHAPE, num_classes=NUM_CLASSES,
                               score_net_args=dict(patch_size=1, hidden_size=16, depth=1, num_heads=2))
    assert loss_fn.weight == 1.0
    from generators import build_generator
    ref = build_generator("Tiny", input_size=3, in_channels=2, num_classes=NUM_CLASSES,
                          patch_size=1, hidden_size=16, depth=1, num_heads=2)
    assert type(loss_fn.fake) is type(ref)
    assert [p.shape for p in loss_fn.fake.parameters()] == [p.shape for p in ref.parameters()]
