"""Record columns from detector features: an FD with its bootstrap interval, and the FD/KID/
precision/recall set of one feature space under a column suffix (``fd_domain``, ...).

The eval stages (fid_ref, recon_eval, gen_eval) build their records from these, so the same
metric has the same name and the same computation wherever it appears.
"""
from __future__ import annotations

import numpy as np
import torch

from benchmark.metrics.bootstrap import fd_bootstrap
from benchmark.metrics.generation import feature_statistics, frechet_distance, generation_metrics

# Rows per block of precision/recall's distance matrices for the large domain sets.
PRC_BLOCK = 2000


def fd_interval_columns(name: str, gen_pool: torch.Tensor, ref_stats: tuple[np.ndarray, np.ndarray],
                        replicates: int, seed: int) -> dict[str, float]:
    """``{name}_lo``, ``{name}_hi``: the 95% bootstrap interval (bias-corrected percentile,
    benchmark/metrics/bootstrap.py) of the FD of ``gen_pool`` against the fixed reference
    statistics, and ``{name}_boot_bias``, the bias removed (nothing when ``replicates`` is 0)."""
    if replicates <= 0:
        return {}
    iv = fd_bootstrap(gen_pool, *ref_stats, replicates=replicates, seed=seed)
    return {f"{name}_lo": iv.lo, f"{name}_hi": iv.hi, f"{name}_boot_bias": iv.bias}


def space_columns(gen_pool: torch.Tensor, ref_pool: torch.Tensor, suffix: str, kid_subset_size: int,
                  seed: int, prefix: str = "") -> dict[str, float]:
    """FD, KID (mean and std), precision and recall of generated vs reference features, named
    ``{prefix}fd{suffix}``, ``{prefix}kid{suffix}``, ... (e.g. ``floor_fd_domain``)."""
    m = generation_metrics({"pool": gen_pool}, {"pool": ref_pool}, kid_subset_size=kid_subset_size, seed=seed,
                           prc_batch_size=PRC_BLOCK)
    return {f"{prefix}fd{suffix}": m["fid"], f"{prefix}kid{suffix}": m["kid_mean"],
            f"{prefix}kid_std{suffix}": m["kid_std"], f"{prefix}precision{suffix}": m["precision"],
            f"{prefix}recall{suffix}": m["recall"]}


def fd(gen_pool: torch.Tensor, ref_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """The FD of ``gen_pool`` against reference statistics (torch-fidelity's formula)."""
    return frechet_distance(*feature_statistics(gen_pool), *ref_stats)


def named_fds(prefix: str, gen: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
              versions: dict[str, str]) -> dict[str, float | str]:
    """FD per extra detector, ``{prefix}_{slug}`` (``fd_mobilenet_v2``), with its version string
    (``{prefix}_{slug}_detector``); ``gen``/``ref``: pool features by registry name."""
    out: dict[str, float | str] = {}
    for name, pool in gen.items():
        slug = name.split("-")[0]  # mobilenet_v2-imagenet -> mobilenet_v2, as stages.common.metric_slug
        out[f"{prefix}_{slug}"] = fd(pool, feature_statistics(ref[name]))
        out[f"{prefix}_{slug}_detector"] = versions[name]
    return out
