"""Stage 1 of a cell: build p_ref. Analytic priors just record their parameters; priors with
something to fit (feature priors) do it here, once for every cell that shares the prior."""
from __future__ import annotations

import torch

from benchmark.dag import Node
from benchmark.stages.common import build_prior, dataset
from benchmark.store import save_torch
from priors import FitContext, has_exact_velocity


def run(node: Node) -> dict:
    cfg = node.cfg
    prior = build_prior(cfg)
    prior.fit(FitContext(dataset=dataset(cfg, "train"), out_dir=node.dir, seed=int(cfg["seed"])))
    save_torch(node.dir / "prior.pt", prior.state_dict())
    # A sample of p_ref documents the reference's scale next to the latents we train.
    s = prior.sample(2048, generator=torch.Generator().manual_seed(0))
    return {"prior_exact_score": has_exact_velocity(prior), "prior_sample_mean": float(s.mean()),
            "prior_sample_std": float(s.std()), "latent_shape": list(prior.latent_shape)}
