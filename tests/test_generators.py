"""Contract and correctness tests for generators/ (CPU only)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from generators import (
    EMA,
    GENERATORS,
    FlowDiT,
    balanced_labels,
    build_generator,
    flow_matching_loss,
    guided_velocity,
    interpolate,
    random_labels,
    sample,
    sample_t,
    shift_time,
    velocity_target,
    velocity_to_x1,
)
from generators.sampling import METHODS

logger = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(input_size: int = 8, in_channels: int = 4, num_classes: int = 3, **kw) -> FlowDiT:
    torch.manual_seed(0)
    model = build_generator("Tiny", input_size, in_channels, num_classes, **kw)
    # adaLN-Zero starts with a zero output; perturb it so tests see a non-trivial velocity.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------- path math


def test_velocity_to_x1_recovers_z() -> None:
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    x_t = interpolate(z, eps, t)
    torch.testing.assert_close(x_t[0], eps[0])
    torch.testing.assert_close(x_t[-1], z[-1])
    torch.testing.assert_close(velocity_to_x1(x_t, velocity_target(z, eps), t), z)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_sample_t_range_and_seed(kind: str) -> None:
    t = sample_t(4096, kind, t_range=(0.2, 0.7), shift=3.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.min() >= 0.2 and t.max() <= 0.7
    again = sample_t(4096, kind, t_range=(0.2, 0.7), shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="known"):
        sample_t(4, "beta")


def test_shift_moves_time_towards_noise() -> None:
    t = torch.linspace(0, 1, 11)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] < t[1:-1]).all()  # shift > 1: more time near t = 0 (noise)
    assert abs(shift_time(torch.tensor(0.5), 3.0).item() - 0.25) < 1e-6


def test_flow_matching_loss_is_seeded_scalar() -> None:
    model = _tiny().train()
    z, y = torch.randn(6, 4, 8, 8), torch.randint(0, 3, (6,))
    a = flow_matching_loss(model, z, y, generator=torch.Generator().manual_seed(1))
    b = flow_matching_loss(model, z, y, generator=torch.Generator().manual_seed(1))
    assert a.ndim == 0 and torch.equal(a, b)
    a.backward()
    assert model.final_layer.linear.weight.grad is not None


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    "input_size,in_channels,patch_size,pos_embed",
    [(8, 4, 2, "rope"), (8, 1, 1, "learned"), (16, 32, 2, "rope"), (16, 8, 1, "rope")],
)
def test_forward_shapes(input_size: int, in_channels: int, patch_size: int, pos_embed: str) -> None:
    model = _tiny(input_size, in_channels, 5, patch_size=patch_size, pos_embed=pos_embed)
    x = torch.randn(2, in_channels, input_size, input_size)
    y = torch.tensor([0, model.null_label])
    out = model(x, torch.rand(2), y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (model.num_classes, model.null_label, model.in_channels, model.input_size) == (
        5, 5, in_channels, input_size,
    )


def test_bf16_autocast_and_rope() -> None:
    model = _tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(x, t, y), atol=0.05, rtol=0.05)
    # RoPE is a rotation: norms kept, token (0, 0) untouched
    rope = model.blocks[0].attn.rope
    q = torch.randn(2, 4, 16, 32)
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rope(q)[:, :, 0], q[:, :, 0])


def test_plain_dit_variant_and_bad_configs() -> None:
    model = _tiny(swiglu=False, rmsnorm=False, qk_norm=False, pos_embed="learned")
    assert model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_generator("Tiny", 8, 4, 3, patch_size=3)
    with pytest.raises(ValueError, match="known"):
        build_generator("Tiny", 8, 4, 3, pos_embed="sincos")


def test_label_dropout_only_in_training() -> None:
    model = _tiny()
    model.y_embedder.dropout_prob = 1.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    null = torch.full_like(y, model.null_label)
    assert not torch.equal(model(x, t, y), model(x, t, null))  # eval: labels kept
    model.train()
    torch.testing.assert_close(model(x, t, y, generator=torch.Generator().manual_seed(0)), model(x, t, null))


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_factory_builds(name: str) -> None:
    if name in ("Tiny", "S"):
        model = build_generator(name, 8, 4, 10, patch_size=1)
        out = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3]))
        assert out.shape == (1, 4, 8, 8)
    # Every size builds on the meta device (no memory, no init cost) for the paper's latent.
    with torch.device("meta"):
        model = build_generator(name, 16, 32, 1000, patch_size=1)
    n_params = sum(p.numel() for p in model.parameters())
    expected = {"Tiny": 1.4e6, "S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}[name]
    assert abs(n_params / expected - 1) < 0.02, n_params
    sd = model.state_dict()
    assert not any("rope" in k for k in sd)  # RoPE tables are derived, not checkpointed


def test_unknown_generator_lists_known() -> None:
    with pytest.raises(KeyError, match="XL"):
        build_generator("XXL", 8, 4, 10)


# --------------------------------------------------------------------------- sampling


def test_cfg_scale_one_is_exactly_conditional() -> None:
    model = _tiny()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(guided_velocity(model, x, t, y, 1.0), model(x, t, y))
        v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, model.null_label))
        torch.testing.assert_close(guided_velocity(model, x, t, y, 4.0), v_c + 3.0 * (v_c - v_u))
    noise = torch.randn(3, 4, 8, 8)
    cond = sample(model, noise, y, steps=4, cfg_scale=1.0)
    # guidance restricted to an interval that no grid time falls in == no guidance
    outside = sample(model, noise, y, steps=4, cfg_scale=5.0, cfg_interval=(0.9, 0.95))
    guided = sample(model, noise, y, steps=4, cfg_scale=5.0)
    assert torch.equal(cond, outside) and not torch.allclose(cond, guided)


@pytest.mark.parametrize("method", METHODS)
def test_sampler_shapes_and_determinism(method: str) -> None:
    model = _tiny()
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = balanced_labels(4, 3)

    def run(seed: int) -> torch.Tensor:
        return sample(model, noise, y, steps=5, method=method, cfg_scale=2.0, time_shift=2.0,
                      generator=torch.Generator().manual_seed(seed))

    a, b = run(1), run(1)
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    if method == "euler_maruyama":
        assert not torch.equal(a, run(2))
    with pytest.raises(ValueError, match="euler"):
        sample(model, noise, y, method="dpm")


def test_labels() -> None:
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    r = random_labels(100, 10, torch.Generator().manual_seed(0))
    assert r.dtype == torch.long and r.min() >= 0 and r.max() < 10
    assert torch.equal(r, random_labels(100, 10, torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------- EMA


def test_ema_hand_computed() -> None:
    lin = _with_count()
    with torch.no_grad():
        lin.weight.fill_(0.0)
        lin.bias.fill_(4.0)
    ema = EMA(lin, decay=0.5)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(0.0)
        lin.count.fill_(7)
    ema.update(lin)  # w: 0.5*0 + 0.5*2 = 1;  b: 0.5*4 + 0.5*0 = 2
    with torch.no_grad():
        lin.weight.fill_(4.0)
    ema.update(lin)  # w: 0.5*1 + 0.5*4 = 2.5;  b: 0.5*2 + 0 = 1
    assert ema.module.weight.item() == 2.5 and ema.module.bias.item() == 1.0
    assert ema.module.count.item() == 7  # buffers are copied, not averaged
    other = EMA(_with_count(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 2 and other.module.weight.item() == 2.5


def _with_count() -> nn.Module:
    m = nn.Linear(1, 1)
    m.register_buffer("count", torch.tensor(0))
    return m


# --------------------------------------------------------------------------- end to end


def _swd(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256) -> float:
    """Sliced Wasserstein-2 distance between two equal-size sample sets (random directions)."""
    a, b = a.flatten(1), b.flatten(1)
    d = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(123))
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


@pytest.mark.slow
def test_tiny_learns_gaussian_mixture() -> None:
    """Tiny FlowDiT, 300 AdamW steps (batch 128) on a 4-mode mixture of [2, 2, 2] latents
    (mode means N(0, I_8), std 0.25, class = mode), then 20-step sampling per class.

    Measured (seeds fixed, torch 2.14.1 CPU): SWD(model, target) = 0.063 (euler), 0.062 (heun),
    0.074 (euler_maruyama); finite-sample floor SWD(target, fresh target) = 0.037-0.042;
    SWD(noise, target) = 0.733. Threshold 0.12: 3x the floor and 1/6 of the noise distance.
    """
    k, shape, std = 4, (2, 2, 2), 0.25
    g = torch.Generator().manual_seed(0)
    means = torch.randn(k, 8, generator=g)

    def draw(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return (means[y] + std * torch.randn(len(y), 8, generator=gen)).view(-1, *shape)

    torch.manual_seed(0)
    model = build_generator("Tiny", 2, 2, k, patch_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50))
    for _ in range(300):
        y = random_labels(128, k, g)
        loss = flow_matching_loss(model, draw(y, g), y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
    model.eval()

    n = 512
    y = balanced_labels(n, k)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    target = draw(y, torch.Generator().manual_seed(2))
    swd_noise = _swd(noise, target)
    for method in METHODS:
        x = sample(model, noise, y, steps=20, method=method, generator=torch.Generator().manual_seed(3))
        swd = _swd(x, target)
        logger.info("GMM: %s SWD %.4f (noise %.4f)", method, swd, swd_noise)
        assert swd < 0.12 and swd < 0.2 * swd_noise, (method, swd, swd_noise)
        # conditioning works: each class lands on its own mode (modes are ~4 apart)
        for c in range(k):
            assert (x[y == c].flatten(1).mean(0) - means[c]).norm() < 0.4
