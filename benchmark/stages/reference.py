"""Stage 1 of a cell: build p_ref. Analytic priors just record their parameters; priors with
something to fit do it here, once for every cell that shares the prior: feature priors run the
frozen-backbone stage (priors/features.py), difftraj encodes with its base tokenizer."""
from __future__ import annotations

import torch

from benchmark.dag import Node
from benchmark.stages.common import build_prior, dataset
from benchmark.store import save_torch
from priors import FitContext, has_exact_velocity


def fit_context(node: Node) -> FitContext:
    """What the prior may use: the train split, and the outputs of the upstream stages it
    declared (``upstream(cfg)``), by role."""
    from benchmark.upstream import STAGES
    inputs = {role: STAGES.get(dep.stage).output(dep) for role, dep in node.deps.items()}
    return FitContext(dataset=dataset(node.cfg, "train"), out_dir=node.dir, seed=int(node.cfg["seed"]),
                      inputs=inputs, input_keys={role: dep.key for role, dep in node.deps.items()})


def run(node: Node) -> dict:
    prior = build_prior(node.cfg)
    prior.fit(fit_context(node))
    save_torch(node.dir / "prior.pt", prior.state_dict())
    # A sample of p_ref documents the reference's scale next to the latents we train.
    s = prior.sample(2048, generator=torch.Generator().manual_seed(0))
    describe = getattr(prior, "describe", None)
    return {"prior_exact_score": has_exact_velocity(prior), "prior_sample_mean": float(s.mean()),
            "prior_sample_std": float(s.std()), "latent_shape": list(prior.latent_shape),
            **(describe() if callable(describe) else {})}
