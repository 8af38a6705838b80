"""Contract of every registered prior, and the exact scores checked against autograd."""
import math

import pytest
import torch

from priors import PRIORS, has_exact_velocity

SHAPE = (2, 4, 4)


CSHAPE = (4, 8, 8)  # the cpu-tiny latent: 32 px images, 3 encoder levels
TINY_STAGE1 = {"iters": 3, "batch_size": 8, "decoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]}}


def _features(backbone: dict) -> dict:
    return {"name": "features", "backbone": backbone, "n_images": 48, "stage1": TINY_STAGE1}


# Every built-in prior at CPU size, with random backbone weights where none ship offline.
CONTRACT = {
    "gaussian": {"name": "gaussian"},
    "gmm": {"name": "gmm", "num_components": 3},
    "features/offline-mae": _features({"name": "offline-mae", "pretrained": False,
                                       "arch": {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 32}}),
    "features/mobilenet_v2": _features({"name": "mobilenet_v2", "pretrained": False, "input_size": 128}),
    "features/timm-dinov2": _features({"name": "timm", "model": "vit_small_patch14_dinov2.lvd142m",
                                       "pretrained": False, "patch_size": 8, "input_size": 64,
                                       "model_args": {"depth": 1, "embed_dim": 64, "num_heads": 2}}),
    "features/timm-mae": _features({"name": "timm", "model": "vit_base_patch16_224.mae", "pretrained": False,
                                    "input_size": 64, "patch_size": 8,
                                    "model_args": {"depth": 1, "embed_dim": 64, "num_heads": 2}}),
    "features/timm-resnet": _features({"name": "timm", "model": "resnet18.a1_in1k", "pretrained": False,
                                       "input_size": 256}),
    "features/open_clip": _features({"name": "open_clip", "model": "ViT-B-16", "pretrained": None, "input_size": 128}),
    "text": {"name": "text", "text_encoder": {"name": "open_clip", "model": "ViT-B-32", "pretrained": None},
             "templates": ["a photo of a {}.", "a drawing of a {}."]},
    "difftraj": {"name": "difftraj", "n_images": 48},
    "subset": {"name": "subset", "classes": [0, 1],
               "base": _features({"name": "mobilenet_v2", "pretrained": False, "input_size": 128})},
}


@pytest.fixture(scope="module")
def fit_ctx():
    from benchmark.data import load_images, subset
    from priors import FitContext
    from tokenizers import LatentNorm, build_tokenizer
    torch.manual_seed(0)
    data = subset(load_images("fashion_mnist", "train", 32), 96, seed=0)
    # difftraj's base tokenizer: an untrained one is enough to check the contract.
    tok = build_tokenizer({"encoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]},
                           "decoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]}, "latent_channels": 4},
                          32, 1, stochastic=False).eval()
    with torch.no_grad():
        norm = LatentNorm.fit(tok.encode(data.float_batch(torch.arange(32))))
    return FitContext(dataset=data, seed=0, inputs={"base_tokenizer": (tok, norm)})


def test_every_builtin_prior_has_a_contract_case():
    builtin = {n for n in PRIORS.names() if PRIORS._origin[n].startswith("priors.")}
    assert builtin == {k.split("/")[0] for k in CONTRACT}


@pytest.mark.parametrize("case", sorted(CONTRACT))
def test_prior_contract(case, fit_ctx, one_thread):
    cfg = dict(CONTRACT[case])
    cls = PRIORS.get(cfg.pop("name"))
    prior = cls(latent_shape=CSHAPE, **cfg)
    prior.fit(fit_ctx)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = prior.sample(7, generator=g()), prior.sample(7, generator=g())
    assert a.shape == (7, *CSHAPE) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.equal(a, b)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    la, lb = prior.sample(7, generator=g(), labels=labels), prior.sample(7, generator=g(), labels=labels)
    assert la.shape == a.shape and torch.equal(la, lb)
    # state_dict round trip into a fresh, unfitted instance gives the same samples.
    clone = cls(latent_shape=CSHAPE, **{**cfg, "seed": 123})
    clone.load_state_dict(prior.state_dict())
    assert torch.equal(clone.sample(7, generator=g()), a)
    assert torch.equal(clone.sample(7, generator=g(), labels=labels), la)
    if case.startswith(("features", "subset")):
        assert prior.describe()["backbone_weights"] == "random"   # labelled, never passed off as pretrained


def test_feature_prior_is_class_conditional(fit_ctx, one_thread):
    prior = PRIORS.get("features")(latent_shape=CSHAPE, **{k: v for k, v in CONTRACT["features/mobilenet_v2"].items()
                                                         if k != "name"})
    prior.fit(fit_ctx)
    assert abs(float(prior.bank.mean())) < 1e-4 and abs(float(prior.bank.std()) - 1) < 1e-3  # normalised
    z = prior.sample(20, generator=torch.Generator().manual_seed(0), labels=torch.full((20,), 3))
    rows = [(prior.bank == zi).flatten(1).all(1).nonzero().flatten() for zi in z]
    assert all(len(r) and int(prior.labels[r[0]]) == 3 for r in rows)


def test_subset_keeps_only_its_classes(fit_ctx, one_thread):
    cfg = {k: v for k, v in CONTRACT["subset"].items() if k != "name"}
    prior = PRIORS.get("subset")(latent_shape=CSHAPE, **cfg)
    prior.fit(fit_ctx)
    assert len(prior.labels) and set(prior.labels.tolist()) <= {0, 1} and prior.name == "sub-features"


def test_difftraj_noise_level(fit_ctx):
    prior = PRIORS.get("difftraj")(latent_shape=CSHAPE, n_images=48, t=0.5)
    prior.fit(fit_ctx)
    z = prior.sample(4000, generator=torch.Generator().manual_seed(0))
    # x_t = t z + (1 - t) eps with unit-variance z (normalised latents): Var = t^2 Var(z) + (1-t)^2.
    var_z = float(prior.bank.var())
    assert abs(float(z.var()) - (0.25 * var_z + 0.25)) < 0.05


def test_text_prior_keeps_caption_geometry(fit_ctx):
    prior = PRIORS.get("text")(latent_shape=CSHAPE, **{k: v for k, v in CONTRACT["text"].items() if k != "name"})
    prior.fit(fit_ctx)
    assert prior.means.shape == (20, math.prod(CSHAPE)) and prior.info["text_weights"] == "random"
    # Mixture variance per latent value is 1 by construction.
    z = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    assert abs(float(z.var()) - 1.0) < 0.05


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
