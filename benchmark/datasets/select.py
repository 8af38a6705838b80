"""Row selections that work on every set (in memory or file-backed) through ``select(idx)``."""
from __future__ import annotations

import torch


def subset(ds, n: int | None, seed: int = 0):
    """A fixed, class-stratified-by-chance random subset (n=None keeps everything)."""
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].sort().values
    return ds.select(idx)


def class_balanced(ds, n: int, seed: int = 0):
    """``n`` rows, class-balanced (n // K per class, the first n % K classes one more), in
    round-robin order over classes with a random order within each class, so that every prefix
    is class-balanced too."""
    g = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(ds.labels == c).flatten() for c in range(ds.num_classes)]
    per_class = [rows[torch.randperm(len(rows), generator=g)] for rows in per_class]
    need = [n // ds.num_classes + (c < n % ds.num_classes) for c in range(ds.num_classes)]
    short = [c for c, rows in enumerate(per_class) if len(rows) < need[c]]
    if short:
        raise ValueError(f"{n} class-balanced training images need {max(need)} of each class; "
                         f"classes {short} have fewer")
    idx = torch.stack([rows[:max(need)] for rows in per_class], dim=1).flatten()[:n]  # round-robin
    return ds.select(idx)
