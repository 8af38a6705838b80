"""Contract of every registered prior, and the exact scores checked against autograd."""
import math

import pytest
import torch

from priors import PRIORS, has_exact_velocity

SHAPE = (2, 4, 4)


@pytest.mark.parametrize("name", PRIORS.names())
def test_prior_contract(name):
    prior = PRIORS.get(name)(latent_shape=SHAPE)
    a = prior.sample(5, generator=torch.Generator().manual_seed(3))
    b = prior.sample(5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, *SHAPE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    clone = PRIORS.get(name)(latent_shape=SHAPE, seed=123)
    clone.load_state_dict(prior.state_dict())
    c = clone.sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, c)


def _log_density_gmm(x, means, s, t):
    var = t ** 2 * s ** 2 + (1 - t) ** 2
    d = x.shape[-1]
    diff = x[:, None, :] - t * means[None]
    logp = -0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * math.log(2 * math.pi * var)
    return torch.logsumexp(logp, 1) - math.log(means.shape[0])


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_gmm_velocity_matches_tweedie(t):
    """v = E[z - eps | x_t] from the score of p_t by Tweedie: E[z|x] = (x + (1-t)^2 score) / t."""
    prior = PRIORS.get("gmm")(latent_shape=SHAPE, num_components=4, component_std=0.4, seed=1)
    x = torch.randn(6, math.prod(SHAPE), dtype=torch.float64, requires_grad=True)
    logp = _log_density_gmm(x, prior.means.double(), prior.s, t).sum()
    score, = torch.autograd.grad(logp, x)
    z_hat = (x + (1 - t) ** 2 * score) / t
    eps_hat = (x - t * z_hat) / (1 - t)
    v_ref = (z_hat - eps_hat).detach()
    v = prior.velocity(x.detach().reshape(6, *SHAPE), torch.full((6,), t, dtype=torch.float64))
    torch.testing.assert_close(v.reshape(6, -1), v_ref, rtol=1e-6, atol=1e-6)


def test_gaussian_velocity_is_gmm_limit():
    g = PRIORS.get("gaussian")(latent_shape=SHAPE)
    x = torch.randn(3, *SHAPE)
    t = torch.tensor([0.2, 0.5, 0.8])
    # For N(0, I): E[z - eps | x_t] = (2t - 1) / (t^2 + (1 - t)^2) x_t.
    expect = ((2 * t - 1) / (t ** 2 + (1 - t) ** 2)).view(3, 1, 1, 1) * x
    torch.testing.assert_close(g.velocity(x, t), expect)
    assert has_exact_velocity(g)


def test_gmm_bad_parameters_rejected():
    with pytest.raises(ValueError, match="component_std"):
        PRIORS.get("gmm")(latent_shape=SHAPE, component_std=1.5)
