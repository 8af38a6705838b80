"""Sample-quality metrics from detector features: FID, KID, precision/recall, IS.

Every formula is torch-fidelity 0.4.0's own function (metric_fid/kid/prc/isc.py), called on
features we extract ourselves, so numbers match ``torch_fidelity.calculate_metrics`` given the
same features and seeds. This module only validates inputs and adapts shapes and types.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

log = logging.getLogger(__name__)

IS_SPLITS = 10  # torch-fidelity DEFAULTS["isc_splits"], the original IS protocol's 10 splits
# Above this many rows on either side, precision/recall go through torch-fidelity's blocked path
# even when no block size is asked for: at paper scale (50,000 x 50,000) each whole distance
# matrix would take 20 GB in float64, the blocks of 2,000 rows 0.8 GB. Same formula.
AUTO_BLOCK_ROWS, AUTO_BLOCK = 10_000, 2_000


def _check_features(x: torch.Tensor, what: str, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected a 2-D feature tensor [N, D], got {shape}")
    if len(x) < min_rows:
        raise ValueError(f"{what}: needs at least {min_rows} samples, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    return x.detach().cpu().double()


def feature_statistics(pool: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (np.cov, ddof=1) of [N, D] features, float64."""
    stats = fid_features_to_statistics(_check_features(pool, "feature_statistics"))
    return stats["mu"].astype(np.float64), np.atleast_2d(stats["sigma"]).astype(np.float64)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians (Heusel et al. 2017), via torch-fidelity.

    torch-fidelity takes the trace of sqrt(sigma1 @ sigma2) from its eigenvalues, which stays
    finite for the rank-deficient covariances of small sample sets (N < D).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: need mu [D] and sigma [D, D] on both sides; got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    # One BLAS thread: right after torch work, OpenBLAS's second thread fights torch's spinning
    # OpenMP workers, and eigvals on 2048x2048 took 30-44 s with 2 threads vs 3-5 s with 1
    # on the 2-core reference machine.
    with threadpool_limits(limits=1, user_api="blas"):
        out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                       verbose=False)
    return float(out[KEY_METRIC_FID])


def generation_metrics(
    gen: dict,
    ref: dict,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    seed: int = 0,
    prc_batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """FID, KID, precision/recall (gen vs ref pool features) and IS (gen logits, if any).

    ``gen`` and ``ref`` are ``Detector.features`` outputs from the same detector. Returns
    floats; ``is_mean``/``is_std`` are None when the detector has no logits (never 0).
    ``prc_batch_size``: None = torch-fidelity's default path (whole N x N distance matrices) up to
    AUTO_BLOCK_ROWS rows, blocks of AUTO_BLOCK beyond; a number = its memory-saving path in blocks
    of that many rows, the same formula (10,000 x 10,000 matrices in float64 take 0.8 GB each).
    ``device``: where precision/recall's distances are computed (float64 either way). At 50,000 x
    50,000 they are ~4e13 flops, minutes on CPU cores and about a second on a GPU; a GPU's
    distances can differ from the CPU's in the last bits, which could flip a k-NN tie.
    """
    for what, d in (("gen", gen), ("ref", ref)):
        if not isinstance(d, dict) or "pool" not in d:
            raise ValueError(f"{what}: expected Detector.features() output, a dict with 'pool'")
    # kthvalue(k + 1) over each set's own distances needs k + 1 samples (metric_prc.py).
    min_rows = max(2, prc_neighborhood + 1)
    g = _check_features(gen["pool"], "gen['pool']", min_rows)
    r = _check_features(ref["pool"], "ref['pool']", min_rows)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dims differ: gen {g.shape[1]} vs ref {r.shape[1]}; same detector?")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise ValueError(
            f"need kid_subsets >= 1 and kid_subset_size >= 2, got {kid_subsets}, {kid_subset_size}"
        )

    fid = frechet_distance(*feature_statistics(g), *feature_statistics(r))

    # torch-fidelity refuses subsets larger than either set; clamp instead of failing small runs.
    subset = min(kid_subset_size, len(g), len(r))
    if subset < kid_subset_size:
        log.warning("KID subset size clamped from %d to %d (sample count)", kid_subset_size, subset)
    # A subset as large as both sets is each whole set in another order, and KID's unbiased MMD
    # does not depend on the order: all of torch-fidelity's subsets then give one number (kid_std
    # ~1e-16, rounding), so one is computed. The CPU presets score 500 vs 500 samples this way:
    # 100 subsets of 500 x 2048 features cost ~5 s a stage for nothing.
    if subset == len(g) == len(r):
        kid_subsets = 1
    kid = kid_features_to_metric(g, r, kid_subsets=kid_subsets, kid_subset_size=subset,
                                 rng_seed=seed, verbose=False)
    # torch-fidelity's convention: input 1 is generated, input 2 is real (metric_prc.py).
    if prc_batch_size is None and max(len(g), len(r)) > AUTO_BLOCK_ROWS:
        prc_batch_size = AUTO_BLOCK
    blocks = {} if prc_batch_size is None else {"save_cpu_ram": True, "prc_batch_size": int(prc_batch_size)}
    on = torch.device(device) if device is not None else g.device
    prc = prc_features_to_metric(g.to(on), r.to(on), prc_neighborhood=prc_neighborhood, verbose=False, **blocks)

    is_mean = is_std = None
    logits = gen.get("logits")
    if logits is not None:
        lg = _check_features(logits, "gen['logits']", IS_SPLITS)
        if len(lg) != len(g):
            raise ValueError(f"gen has {len(g)} pool rows but {len(lg)} logit rows")
        isc = isc_features_to_metric(lg, splits=IS_SPLITS, shuffle=True, rng_seed=seed)
        is_mean, is_std = float(isc[KEY_METRIC_ISC_MEAN]), float(isc[KEY_METRIC_ISC_STD])

    return {
        "fid": fid,
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "precision": float(prc[KEY_METRIC_PRECISION]),
        "recall": float(prc[KEY_METRIC_RECALL]),
        "is_mean": is_mean,
        "is_std": is_std,
    }


def load_npz_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reference (mu, sigma) from an ADM-style .npz (openai/guided-diffusion evaluations)."""
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: no {missing} array(s); it holds {sorted(data.files)}. "
                             "Expected ADM-style reference statistics with 'mu' and 'sigma'.")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma
