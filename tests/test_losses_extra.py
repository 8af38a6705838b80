"""Unit tests of the sample-based matching losses (mmd, swd, adversarial) and VA-VAE's align."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from priors import LOSSES, PRIORS
from priors.losses import adversarial, align, mmd, swd  # noqa: F401  (registers the four losses)
from priors.losses.align import cosine_margin_loss, distance_matrix_margin_loss
from priors.losses.mmd import mmd2_unbiased

SHAPE = (4, 4, 4)
CONF = Path(__file__).resolve().parents[1] / "benchmark" / "conf" / "loss"


pytestmark = pytest.mark.usefixtures("one_thread")


class FeaturePrior:
    """Stand-in for a feature prior: fixed per-call features for align (D = 6, 4 x 4 grid)."""
    name = "fake-features"
    align_dim = 6

    def __init__(self, feats: torch.Tensor) -> None:
        self.feats = feats

    def align_targets(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        return self.feats[:n]


def _gauss():
    return PRIORS.get("gaussian")(latent_shape=SHAPE)


def _build(name: str, **kw):
    common = dict(latent_shape=SHAPE, num_classes=3)
    if name == "align":
        torch.manual_seed(3)
        common["prior"] = FeaturePrior(torch.randn(16, 6, 4, 4))
    else:
        common["prior"] = _gauss()
    torch.manual_seed(0)  # network initialisation
    return LOSSES.get(name)(**{**common, **kw})


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("name", ["mmd", "swd"])
def test_small_on_prior_samples_large_when_shifted_or_scaled(name):
    loss_fn = _build(name)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(128, *SHAPE, generator=g)
    same, _ = loss_fn(z, _labels(128), 0)
    shifted, _ = loss_fn(z + 1.0, _labels(128), 0)
    scaled, _ = loss_fn(3.0 * z, _labels(128), 0)
    assert abs(float(same)) < 0.1 * float(shifted)
    assert abs(float(same)) < 0.1 * float(scaled)


def test_mmd_unbiased_estimate_is_zero_in_expectation():
    g = torch.Generator().manual_seed(0)
    vals = torch.tensor([float(mmd2_unbiased(torch.randn(16, 3, generator=g),
                                             torch.randn(16, 3, generator=g))[0]) for _ in range(300)])
    se = vals.std() / math.sqrt(len(vals))
    assert abs(float(vals.mean())) < 3 * float(se)
    shifted = float(mmd2_unbiased(torch.randn(16, 3, generator=g) + 1.5, torch.randn(16, 3, generator=g))[0])
    assert shifted > 20 * abs(float(vals.mean()))


def test_mmd_matches_a_direct_double_loop():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 2, generator=g), torch.randn(6, 2, generator=g) + 0.5
    est, h = mmd2_unbiased(x, y, multipliers=(1.0,))
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / h)  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    syy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    sxy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    assert float(est) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-5, abs=1e-6)


def test_adversarial_separates_shifted_latents_only():
    loss_fn = _build("adversarial", lr=1e-3, hidden=64)
    g = torch.Generator().manual_seed(2)
    same_fn = copy.deepcopy(loss_fn)
    for step in range(150):
        z = torch.randn(128, *SHAPE, generator=g)
        same_fn.update(z, _labels(128), step)
        loss_fn.update(z + 2.0, _labels(128), step)
    z = torch.randn(256, *SHAPE, generator=g)
    same, _ = same_fn(z, _labels(256), 0)
    shifted, _ = loss_fn(z + 2.0, _labels(256), 0)
    # Equilibrium value of the non-saturating loss is log 2 (D = 1/2 everywhere).
    assert float(same) == pytest.approx(math.log(2), abs=0.15)
    assert float(shifted) > math.log(2) + 1.0


@pytest.mark.parametrize("name", ["mmd", "swd", "adversarial", "align"])
def test_gradient_reaches_latents(name):
    loss_fn = _build(name)
    z = (torch.randn(8, *SHAPE) + 0.5).requires_grad_(True)
    loss, logs = loss_fn(z, _labels(8), 0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(isinstance(v, float) for v in logs.values())
    # The loss's own networks get no gradient from the tokenizer's backward.
    assert all(p.grad is None for p in loss_fn.parameters())


@pytest.mark.parametrize("name", ["mmd", "swd", "adversarial", "align"])
def test_state_round_trip_resumes_exactly(name):
    a = _build(name)
    for step in range(3):
        z = torch.randn(8, *SHAPE)
        a(z, _labels(8), step)
        a.update(z, _labels(8), step)
    b = _build(name)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    b.load_extra_state(copy.deepcopy(a.extra_state()))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    z = torch.randn(8, *SHAPE)
    la, _ = a(z, _labels(8), 3)
    lb, _ = b(z, _labels(8), 3)
    assert torch.equal(la, lb)  # same networks and the same prior-sample / direction draws
    a.update(z, _labels(8), 3)
    b.update(z, _labels(8), 3)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert b.describe()["lambda"] == a.weight


def test_adversarial_update_changes_only_the_discriminator():
    loss_fn = _build("adversarial")
    before = copy.deepcopy(loss_fn.disc.state_dict())
    z = torch.randn(8, *SHAPE, requires_grad=True)
    logs = loss_fn.update(z, _labels(8), 0)
    assert z.grad is None
    assert set(logs) >= {"adv_d", "adv_d_acc"}
    assert all(not torch.equal(v, before[k]) for k, v in loss_fn.disc.state_dict().items())
    assert set(loss_fn.state_dict()) == {f"disc.{k}" for k in before}
    r1 = _build("adversarial", r1_gamma=10.0)
    assert "adv_r1" in r1.update(torch.randn(8, *SHAPE), _labels(8), 0)


def test_align_margins_by_hand():
    g = torch.Generator().manual_seed(5)
    zp, f = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    m1, m2 = 0.5, 0.25
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    mcos = sum(max(0.0, 1 - m1 - cos(zp[n, :, i, j], f[n, :, i, j]))
               for n in range(2) for i in range(2) for j in range(2)) / 8
    zf, ff = zp.flatten(2), f.flatten(2)
    mdms = sum(max(0.0, abs(cos(zf[n, :, i], zf[n, :, j]) - cos(ff[n, :, i], ff[n, :, j])) - m2)
               for n in range(2) for i in range(4) for j in range(4)) / 32
    assert float(cosine_margin_loss(zp, f, m1)) == pytest.approx(mcos, rel=1e-5)
    assert float(distance_matrix_margin_loss(zp, f, m2)) == pytest.approx(mdms, rel=1e-5)


def test_align_margins_are_zero_when_similar_enough():
    f = torch.randn(2, 6, 4, 4)
    assert float(cosine_margin_loss(f, f, 0.5)) == 0.0
    assert float(distance_matrix_margin_loss(2.0 * f, f, 0.25)) == 0.0
    # cos = 0.6 everywhere: above 1 - m1 = 0.5 gives zero, below (m1 = 0.3) gives 0.7 - 0.6.
    a = torch.zeros(1, 2, 3, 3); a[:, 0] = 1.0
    b = torch.zeros(1, 2, 3, 3); b[:, 0] = 0.6; b[:, 1] = 0.8
    assert float(cosine_margin_loss(a, b, 0.5)) == 0.0
    assert float(cosine_margin_loss(a, b, 0.3)) == pytest.approx(0.1, abs=1e-6)
    # Matrices that differ by 0.2 everywhere off the diagonal: inside m2 = 0.25, outside m2 = 0.1.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)       # cos(x_0, x_1) = 0
    y = torch.tensor([[1.0, 0.0], [0.2, math.sqrt(0.96)]]).T.reshape(1, 2, 1, 2)  # cos = 0.2
    assert float(distance_matrix_margin_loss(x, y, 0.25)) == 0.0
    assert float(distance_matrix_margin_loss(x, y, 0.1)) == pytest.approx(2 * 0.1 / 4, abs=1e-6)


def test_align_needs_feature_prior_and_checks_shapes():
    with pytest.raises(ValueError, match="align_targets"):
        LOSSES.get("align")(latent_shape=SHAPE, num_classes=3, prior=_gauss())
    loss_fn = _build("align")
    with pytest.raises(ValueError, match="align targets"):
        loss_fn(torch.randn(2, *SHAPE), _labels(2), 0, target_features=torch.randn(2, 5, 4, 4))
    # A coarser latent grid is compared on the feature grid (bilinear upsampling).
    lat = LOSSES.get("align")(latent_shape=(4, 2, 2), num_classes=3, prior=loss_fn.prior)
    loss, _ = lat(torch.randn(2, 4, 2, 2), _labels(2), 0)
    assert torch.isfinite(loss)


def test_align_update_fits_the_projection_towards_the_features():
    loss_fn = _build("align", cos_margin=0.0, distmat_margin=0.0, proj_lr=1e-2)
    z = torch.randn(16, *SHAPE)
    feats = torch.einsum("dc,nchw->ndhw", torch.randn(6, 4), z)  # a linear map of z exists
    start, _ = loss_fn(z, _labels(16), 0, target_features=feats)
    for step in range(200):
        loss_fn.update(z, _labels(16), step, target_features=feats)
    end, _ = loss_fn(z, _labels(16), 0, target_features=feats)
    assert float(end) < 0.3 * float(start)


@pytest.mark.parametrize("name", ["mmd", "swd", "adversarial", "align"])
def test_yaml_config_builds_the_loss(name):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg.pop("name") == name and "lambda" in cfg
    prior = FeaturePrior(torch.randn(4, 6, 4, 4)) if name == "align" else _gauss()
    loss_fn = LOSSES.get(name).from_config(cfg, inputs={}, latent_shape=SHAPE, num_classes=3, prior=prior)
    assert loss_fn.weight == cfg["lambda"] and loss_fn.tokenizer_every == 1
    loss, _ = loss_fn(torch.randn(4, *SHAPE), _labels(4), 0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["mmd", "swd", "adversarial"])
def test_sample_losses_name_a_missing_prior(name):
    with pytest.raises(ValueError, match="prior"):
        LOSSES.get(name)(latent_shape=SHAPE, num_classes=3, prior=None)
