"""PSNR/SSIM and FID/KID/PRC/IS against independent implementations (numpy/scipy, loops).

reconstruction.py: SSIM is recomputed with scipy's 2-D correlation and the ssim_index.m
constants; PSNR from its definition. generation.py: the Fréchet distance with scipy's sqrtm,
statistics with numpy, KID as the unbiased polynomial-kernel MMD, precision/recall with
explicit k-NN radii, IS from its definition; plus every validation message.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch

from benchmark.metrics import generation as gen_mod
from benchmark.metrics import reconstruction as rec


# ---------------------------------------------------------------- reconstruction

def _np_window():
    r = np.arange(11) - 5.0
    g = np.exp(-r**2 / (2 * 1.5**2))
    g /= g.sum()
    return np.outer(g, g)


def _np_ssim(x, y, data_range):
    w = _np_window()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for xi, yi in zip(x, y):
        maps = []
        for a, b in zip(xi, yi):
            f = lambda im: scipy.signal.correlate2d(im, w, mode="valid")  # noqa: E731
            mx, my = f(a), f(b)
            vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
            maps.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        out.append(np.mean(maps))
    return np.array(out)


def test_gaussian_window_on_the_requested_device():
    # the meta device stands in for a GPU: the window must be built where the images are
    assert rec._gaussian_window(torch.device("meta")).device.type == "meta"


def test_gaussian_window_is_fspecial_11_15():
    w = rec._gaussian_window(torch.device("cpu"))
    assert w.dtype == torch.float64 and w.shape == (11, 11)
    np.testing.assert_allclose(w.numpy(), _np_window(), rtol=1e-12, atol=0)
    assert rec.SSIM_WINDOW == 11 and rec.SSIM_SIGMA == 1.5 and (rec.SSIM_K1, rec.SSIM_K2) == (0.01, 0.03)


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_matches_scipy_reference(data_range):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 13, 17, generator=g) * data_range     # non-square: h and w not swapped
    y = (x + 0.15 * data_range * torch.randn(x.shape, generator=g)).clamp(0, data_range)
    y[1] = x[1] * 0.5 + 0.1 * data_range                        # second image: contrast/offset change
    ours = rec.ssim(x.float(), y.float(), data_range=data_range)
    ref = _np_ssim(x.float().double().numpy(), y.float().double().numpy(), data_range)
    assert ours.dtype == torch.float64 and ours.shape == (2,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-12)
    assert ours[0] != pytest.approx(ours[1].item(), abs=1e-3)


def test_ssim_channels_scored_separately():
    x = torch.rand(1, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 1] = 1 - y[:, 1]
    ref = _np_ssim(x.double().numpy(), y.double().numpy(), 1.0)
    np.testing.assert_allclose(rec.ssim(x, y).numpy(), ref, rtol=1e-9)
    # channel 0 identical -> its map is 1; the mean over channels is (1 + s1) / 2
    s1 = _np_ssim(x[:, 1:].double().numpy(), y[:, 1:].double().numpy(), 1.0)
    np.testing.assert_allclose(rec.ssim(x, y).numpy(), (1 + s1) / 2, rtol=1e-9)


def test_ssim_size_check_each_side():
    ok = torch.rand(1, 1, 11, 11)
    assert rec.ssim(ok, ok).item() == pytest.approx(1.0)
    for h, w in [(10, 20), (20, 10)]:
        x = torch.rand(1, 1, h, w)
        with pytest.raises(ValueError, match=f"ssim: images must be at least 11x11, got {h}x{w}"):
            rec.ssim(x, x)


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_psnr_from_definition(data_range):
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1 * data_range                       # mse = 0.01 d^2      -> 20 dB
    y[1, 0, :2] += 0.2 * data_range                # mse = 0.04 d^2 / 2  -> 10 log10(50)
    out = rec.psnr(x, y, data_range=data_range)
    assert out.dtype == torch.float64
    assert out[0].item() == pytest.approx(20.0, rel=1e-9)
    assert out[1].item() == pytest.approx(10 * math.log10(50), rel=1e-9)
    assert out[2].item() == math.inf


def test_psnr_default_range_and_asymmetric_values():
    x = torch.full((1, 2, 2, 2), 0.5, dtype=torch.float64)
    y = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9], dtype=torch.float64).view(1, 2, 2, 2)
    mse = 0.4**2 / 8
    assert rec.psnr(x, y).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert rec.psnr(y, x).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)


@pytest.mark.parametrize("fn,name", [(rec.psnr, "psnr"), (rec.ssim, "ssim")])
def test_check_pair_messages(fn, name):
    a = torch.rand(1, 1, 12, 12)
    with pytest.raises(ValueError, match=rf"{name}: shapes differ, \(1, 1, 12, 12\) vs \(1, 1, 12, 11\)"):
        fn(a, torch.rand(1, 1, 12, 11))
    with pytest.raises(ValueError, match=rf"{name}: expected images \[N, C, H, W\], got \(1, 12, 12\)"):
        fn(a[0], a[0])
    bad = a.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: inputs contain NaN or inf"):
        fn(bad, a)                 # only x bad
    bad[0, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match=f"{name}: inputs contain NaN or inf"):
        fn(a, bad)                 # only y bad


def test_check_pair_detaches_and_casts():
    x = torch.rand(1, 1, 12, 12, requires_grad=True)
    a, b = rec._check_pair(x, x.detach().half(), "t")
    assert a.dtype == b.dtype == torch.float64 and not a.requires_grad


# ---------------------------------------------------------------- generation: validation

def test_check_features_messages_and_output():
    f = gen_mod._check_features
    with pytest.raises(ValueError, match=r"w: expected a 2-D feature tensor \[N, D\], got \(3,\)"):
        f(torch.zeros(3), "w")
    with pytest.raises(ValueError, match=r"w: expected a 2-D feature tensor \[N, D\], got ndarray"):
        f(np.zeros((3, 2)), "w")
    with pytest.raises(ValueError, match="w: needs at least 2 samples, got 1"):
        f(torch.zeros(1, 4), "w")
    with pytest.raises(ValueError, match="w: needs at least 5 samples, got 4"):
        f(torch.zeros(4, 4), "w", 5)
    assert f(torch.zeros(5, 4), "w", 5).shape == (5, 4)
    for v in (float("nan"), float("inf")):
        x = torch.zeros(3, 2)
        x[1, 1] = v
        with pytest.raises(ValueError, match="w: features contain NaN or inf"):
            f(x, "w")
    out = f(torch.ones(2, 2, requires_grad=True), "w")
    assert out.dtype == torch.float64 and not out.requires_grad and out.device.type == "cpu"


def test_feature_statistics_match_numpy():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)).float()
    mu, sigma = gen_mod.feature_statistics(x)
    xn = x.double().numpy()
    np.testing.assert_allclose(mu, xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(xn, rowvar=False, ddof=1), rtol=1e-10)
    assert mu.dtype == sigma.dtype == np.float64
    mu1, s1 = gen_mod.feature_statistics(torch.arange(4.0).view(4, 1))
    assert s1.shape == (1, 1) and s1[0, 0] == pytest.approx(np.var([0, 1, 2, 3], ddof=1))
    with pytest.raises(ValueError, match="feature_statistics: needs at least 2 samples"):
        gen_mod.feature_statistics(torch.zeros(1, 3))


def _fd_scipy(m1, s1, m2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    s1, s2 = a @ a.T + np.eye(5), b @ b.T + 0.5 * np.eye(5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    assert gen_mod.frechet_distance(m1, s1, m2, s2) == pytest.approx(_fd_scipy(m1, s1, m2, s2), rel=1e-6)
    # 1-D closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    d = gen_mod.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert d == pytest.approx(4.0 + 1.0, rel=1e-9)
    # lists and float32 are accepted (converted to float64)
    assert gen_mod.frechet_distance([0.0, 0.0], np.eye(2, dtype=np.float32), [1.0, 1.0], np.eye(2)) == \
        pytest.approx(2.0, rel=1e-9)


def test_frechet_distance_validation():
    fd = gen_mod.frechet_distance
    mu, s = np.zeros(2), np.eye(2)
    for args in [(np.zeros((2, 2)), s, mu, s), (mu, s, np.zeros(3), s), (mu, np.eye(3), mu, s),
                 (mu, s, mu, np.eye(3)), (np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))]:
        with pytest.raises(ValueError, match=r"frechet_distance: need mu \[D\] and sigma \[D, D\] on both sides; got"):
            fd(*args)
    # mu1 must itself be 1-D: a [1, 1] mu1 against D = 1 statistics is refused, not broadcast
    with pytest.raises(ValueError, match="frechet_distance: need mu"):
        fd(np.zeros((1, 1)), np.eye(1), np.zeros(1), np.eye(1))
    for i, name in enumerate(["mu1", "sigma1", "mu2", "sigma2"]):
        args = [mu.copy(), s.copy(), mu.copy(), s.copy()]
        args[i].flat[0] = np.nan if i % 2 == 0 else np.inf
        with pytest.raises(ValueError, match=f"frechet_distance: {name} contains NaN or inf"):
            fd(*args)


# ---------------------------------------------------------------- generation: metrics

def _kid_full(g, r, degree=3):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over all samples (one subset = all)."""
    d = g.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** degree  # noqa: E731
    m = len(g)
    kxx, kyy, kxy = k(g, g), k(r, r), k(g, r)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def _prc(g, r, k):
    """Precision: share of generated samples inside some real sample's k-NN ball; recall: reverse."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]            # k-th neighbour, self excluded (index 0)

    def inside(q, ref):
        d = np.linalg.norm(q[:, None] - ref[None], axis=-1)
        return (d <= radii(ref)[None]).any(axis=1).mean()

    return inside(g, r), inside(r, g)


def _feats(seed, n=12, d=3, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).double() + shift


def test_generation_metrics_against_independent_formulas():
    g, r = _feats(1, shift=0.7), _feats(2)
    out = gen_mod.generation_metrics({"pool": g.float()}, {"pool": r.float()}, kid_subset_size=12,
                                     kid_subsets=1, prc_neighborhood=3, seed=0)
    gn, rn = g.float().double().numpy(), r.float().double().numpy()
    m1, s1 = gn.mean(0), np.cov(gn, rowvar=False)
    m2, s2 = rn.mean(0), np.cov(rn, rowvar=False)
    assert out["fid"] == pytest.approx(_fd_scipy(m1, s1, m2, s2), rel=1e-6)
    assert out["kid_mean"] == pytest.approx(_kid_full(gn, rn), rel=1e-6)
    assert out["kid_std"] == 0.0
    p, rc = _prc(gn, rn, 3)
    assert (out["precision"], out["recall"]) == (pytest.approx(p), pytest.approx(rc))
    assert out["is_mean"] is None and out["is_std"] is None
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"}
    assert all(isinstance(out[k], float) for k in ("fid", "kid_mean", "kid_std", "precision", "recall"))


def test_precision_recall_not_swapped_and_k_used():
    # generated samples collapse onto one real mode: high precision, low recall
    r = _feats(3, n=16, d=2)
    g = r[:4].repeat(4, 1) + 1e-3 * _feats(4, n=16, d=2)
    for k in (2, 3, 5):
        out = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=16, kid_subsets=1,
                                         prc_neighborhood=k)
        p, rc = _prc(g.numpy(), r.numpy(), k)
        assert (out["precision"], out["recall"]) == (pytest.approx(p), pytest.approx(rc))
    assert out["precision"] > out["recall"]


def test_kid_subsets_are_seeded_and_clamped(caplog):
    g, r = _feats(5, n=10), _feats(6, n=14)
    with caplog.at_level(logging.WARNING, logger="benchmark.metrics.generation"):
        out = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=1000, kid_subsets=3, seed=4)
    assert "KID subset size clamped from 1000 to 10 (sample count)" in caplog.messages
    ref = gen_mod.kid_features_to_metric(g, r, kid_subsets=3, kid_subset_size=10, rng_seed=4, verbose=False)
    assert out["kid_mean"] == pytest.approx(float(ref[gen_mod.KEY_METRIC_KID_MEAN]), rel=1e-12)
    assert out["kid_std"] == pytest.approx(float(ref[gen_mod.KEY_METRIC_KID_STD]), rel=1e-12)
    # the requested subset size is used when both sets are large enough
    ref5 = gen_mod.kid_features_to_metric(g, r, kid_subsets=3, kid_subset_size=5, rng_seed=5, verbose=False)
    five = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=5, kid_subsets=3, seed=5)
    assert five["kid_mean"] == pytest.approx(float(ref5[gen_mod.KEY_METRIC_KID_MEAN]), rel=1e-12)
    # clamped to the smaller set, whichever side it is on
    swapped = gen_mod.generation_metrics({"pool": r}, {"pool": g}, kid_subset_size=1000, kid_subsets=3, seed=4)
    ref_s = gen_mod.kid_features_to_metric(r, g, kid_subsets=3, kid_subset_size=10, rng_seed=4, verbose=False)
    assert swapped["kid_mean"] == pytest.approx(float(ref_s[gen_mod.KEY_METRIC_KID_MEAN]), rel=1e-12)
    other = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=5, kid_subsets=3, seed=5)
    again = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=5, kid_subsets=3, seed=5)
    assert other["kid_mean"] == again["kid_mean"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmark.metrics.generation"):
        gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=10, kid_subsets=1)
    assert not caplog.messages  # no clamp, no warning
    # defaults: kid 100 subsets of 1000 clamped, seed 0, k = 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="benchmark.metrics.generation"):
        d = gen_mod.generation_metrics({"pool": g}, {"pool": r})
    assert caplog.messages == ["KID subset size clamped from 1000 to 10 (sample count)"]
    ref = gen_mod.kid_features_to_metric(g, r, kid_subsets=100, kid_subset_size=10, rng_seed=0, verbose=False)
    assert d["kid_mean"] == pytest.approx(float(ref[gen_mod.KEY_METRIC_KID_MEAN]), rel=1e-12)
    p, rc = _prc(g.numpy(), r.numpy(), 3)
    assert (d["precision"], d["recall"]) == (pytest.approx(p), pytest.approx(rc))


def _is_from_definition(logits, splits_idx):
    p = torch.softmax(logits.double(), dim=1).numpy()
    scores = []
    for idx in splits_idx:
        part = p[idx]
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part) - np.log(py))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_protocol():
    n, c = 40, 5
    g = _feats(7, n=n)
    # every sample certain of a class: IS of a split = exp(H(marginal)); identical logits: IS = 1
    same = torch.zeros(n, c)
    out = gen_mod.generation_metrics({"pool": g, "logits": same}, {"pool": _feats(8, n=n)}, kid_subset_size=10)
    assert out["is_mean"] == pytest.approx(1.0) and out["is_std"] == pytest.approx(0.0, abs=1e-12)
    logits = torch.randn(n, c, generator=torch.Generator().manual_seed(9)) * 3
    out = gen_mod.generation_metrics({"pool": g, "logits": logits}, {"pool": _feats(8, n=n)},
                                     kid_subset_size=10, seed=3)
    # torch-fidelity's protocol: 10 splits of a seeded permutation
    perm = np.random.RandomState(3).permutation(n)
    splits = np.array_split(perm, 10)
    m, s = _is_from_definition(logits, splits)
    assert out["is_mean"] == pytest.approx(m, rel=1e-5) and out["is_std"] == pytest.approx(s, rel=1e-4)
    assert gen_mod.IS_SPLITS == 10


def test_generation_metrics_validation():
    gm = gen_mod.generation_metrics
    ok = {"pool": _feats(1)}
    with pytest.raises(ValueError, match=r"gen: expected Detector.features\(\) output, a dict with 'pool'"):
        gm({"logits": torch.zeros(12, 3)}, ok)
    with pytest.raises(ValueError, match=r"ref: expected Detector.features\(\) output"):
        gm(ok, _feats(2))
    with pytest.raises(ValueError, match=r"feature dims differ: gen 3 vs ref 4; same detector\?"):
        gm(ok, {"pool": _feats(2, d=4)})
    # k + 1 samples needed on each side, and at least 2
    with pytest.raises(ValueError, match=r"gen\['pool'\]: needs at least 4 samples, got 3"):
        gm({"pool": _feats(1, n=3)}, ok)
    with pytest.raises(ValueError, match=r"ref\['pool'\]: needs at least 6 samples, got 5"):
        gm(ok, {"pool": _feats(2, n=5)}, prc_neighborhood=5)
    with pytest.raises(ValueError, match=r"gen\['pool'\]: needs at least 2 samples, got 1"):
        gm({"pool": _feats(1, n=1)}, ok, prc_neighborhood=0)
    gm({"pool": _feats(1, n=4)}, {"pool": _feats(2, n=4)}, kid_subset_size=4)  # exactly k + 1: fine
    gm({"pool": _feats(1, n=2)}, {"pool": _feats(2, n=2)}, kid_subset_size=2, prc_neighborhood=1)
    for kw in [dict(kid_subsets=0), dict(kid_subset_size=1)]:
        with pytest.raises(ValueError, match=r"need kid_subsets >= 1 and kid_subset_size >= 2, got"):
            gm(ok, {"pool": _feats(2)}, **kw)
    gm(ok, {"pool": _feats(2)}, kid_subsets=1, kid_subset_size=2)
    with pytest.raises(ValueError, match=r"gen\['logits'\]: needs at least 10 samples, got 9"):
        gm({"pool": _feats(1, n=9), "logits": torch.zeros(9, 3)}, {"pool": _feats(2, n=9)}, kid_subset_size=9)
    with pytest.raises(ValueError, match="gen has 12 pool rows but 11 logit rows"):
        gm({"pool": _feats(1), "logits": torch.zeros(11, 3)}, ok)


def test_load_npz_statistics(tmp_path):
    p = tmp_path / "ref.npz"
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32) * 2
    np.savez(p, mu=mu, sigma=sigma)
    m, s = gen_mod.load_npz_statistics(p)
    assert m.dtype == s.dtype == np.float64 and np.array_equal(m, mu) and np.array_equal(s, sigma)
    np.savez(tmp_path / "a.npz", mu=mu, other=sigma)
    with pytest.raises(ValueError, match=r"no \['sigma'\] array\(s\); it holds \['mu', 'other'\]. "
                                         r"Expected ADM-style reference statistics with 'mu' and 'sigma'."):
        gen_mod.load_npz_statistics(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\] array"):
        gen_mod.load_npz_statistics(tmp_path / "b.npz")
    for name, m_, s_ in [("c", mu[None], sigma), ("d", mu, sigma[:2]), ("e", mu, np.eye(4))]:
        np.savez(tmp_path / f"{name}.npz", mu=m_, sigma=s_)
        with pytest.raises(ValueError, match=r"are not \[D\] and \[D, D\]"):
            gen_mod.load_npz_statistics(tmp_path / f"{name}.npz")


def test_kid_whole_sets_computed_once_equal_to_every_subset():
    """Subsets as large as both sets are permutations of them: one subset gives torch-fidelity's
    mean over many to rounding, and a std of exactly 0 (its spread was rounding noise)."""
    g, r = _feats(7, n=12), _feats(8, n=12)
    out = gen_mod.generation_metrics({"pool": g}, {"pool": r}, kid_subset_size=12, kid_subsets=50, seed=3)
    ref = gen_mod.kid_features_to_metric(g, r, kid_subsets=50, kid_subset_size=12, rng_seed=3, verbose=False)
    assert out["kid_mean"] == pytest.approx(float(ref[gen_mod.KEY_METRIC_KID_MEAN]), rel=1e-12)
    assert float(ref[gen_mod.KEY_METRIC_KID_STD]) < 1e-12 * abs(out["kid_mean"]) + 1e-15
    assert out["kid_std"] == 0.0
    assert out["kid_mean"] == pytest.approx(_kid_full(g.double().numpy(), r.double().numpy()), rel=1e-9)
