"""Stage 1 of a cell: build p_ref. Analytic priors just record their parameters; priors with
something to fit do it here, once for every cell that shares the prior: feature priors run the
frozen-backbone stage (priors/features.py), difftraj encodes with its base tokenizer.

Data parallel (torchrun / srun tasks, issue #15; benchmark/distributed.py): the prior gets this
process's rank, world size and device in its FitContext (``dist``). Feature priors split the
feature extraction over the ranks (fixed batches, all-gathered: the same features whatever the
number of processes) and train stage 1 on the global batch with averaged gradients, as the
teacher stage does; priors that do not use ``dist`` fit the same thing on every rank. Rank 0
alone writes prior.pt (and stage 1's checkpoints); the others wait for it at a barrier. With one
process the prior is fitted exactly as before (version 3 kept)."""
from __future__ import annotations

import torch

from benchmark import distributed
from benchmark.dag import Node
from benchmark.distributed import DistInfo
from benchmark.stages.common import build_prior, dataset
from benchmark.store import save_torch
from priors import FitContext, has_exact_velocity


def fit_context(node: Node, info: DistInfo | None = None) -> FitContext:
    """What the prior may use: the train split, the outputs of the upstream stages it declared
    (``upstream(cfg)``), by role, and the processes and device it runs on."""
    from benchmark.upstream import STAGES
    inputs = {role: STAGES.get(dep.stage).output(dep) for role, dep in node.deps.items()}
    return FitContext(dataset=dataset(node.cfg, "train"), out_dir=node.dir, seed=int(node.cfg["seed"]),
                      inputs=inputs, input_keys={role: dep.key for role, dep in node.deps.items()},
                      dist=info)


def run(node: Node, info: DistInfo | None = None) -> dict:
    # run_stage joined the launcher's group (if any); a grid worker gets one process here.
    info = info or distributed.current(node.cfg["device"])
    prior = build_prior(node.cfg)
    prior.fit(fit_context(node, info))
    if info.is_main:
        save_torch(node.dir / "prior.pt", prior.state_dict())
    # A sample of p_ref documents the reference's scale next to the latents we train.
    s = prior.sample(2048, generator=torch.Generator().manual_seed(0))
    describe = getattr(prior, "describe", None)
    out = {"prior_exact_score": has_exact_velocity(prior), "prior_sample_mean": float(s.mean()),
           "prior_sample_std": float(s.std()), "latent_shape": list(prior.latent_shape),
           **(describe() if callable(describe) else {})}
    if info.distributed:
        distributed.barrier()  # the other ranks return only once rank 0 has written prior.pt
    return out
