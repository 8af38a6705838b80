"""The built-in stage kinds, one module per stage, each with ``run(node) -> dict`` (the facts
for its record) and, where a dependant needs more than the run directory, ``output(node)``.

The pipeline every cell runs is fid_ref, reference, tokenizer, recon_eval, latent_cache,
generator, gen_eval.
``ssl_backbone`` and ``teacher`` run only when a plug-in declares them (the offline-MAE
backbone; the dm loss without an exact score), exactly as a third-party stage would
(benchmark/upstream.py).
"""
from typing import Callable

from benchmark.upstream import STAGES, register_stage

# name, version, data parallel. Bump a version when a stage's outputs change meaning, so that
# old run directories are not reused.
# reference 2: stage 1 of feature priors; generator 2: EMA snapshot format.
# teacher 2: its network is seeded before it is built (version 1 started from whatever state the
# worker process's RNG was in, so its runs are not reproducible and must not be reused).
# reference 3: prior.pt keeps the stage-1 model; teacher 3: plateau rule and curve; tokenizer 2:
# the stage-1 start, the fake's recipe (lr, warm-up, clip, pre-trained start) and DM CFG; generator 3:
# EMA snapshots.
# domain_detector 1: the classifier whose features the eval stages use beside Inception's (with
# eval.domain.enabled), trained once per dataset; it runs before fid_ref.
# latent_cache 1: the generator's training latents (image and flip), encoded once in shards
# (data parallel); the generator reads them memory-mapped. The generator's outputs keep their
# meaning (the same batches from the same latents), so its version stays.
# teacher data parallel (issue #15): one process draws and computes exactly as before, so version 3 stays.
# ssl_backbone, reference, fid_ref and recon_eval data parallel (issue #15): likewise bit-identical in one
# process, so their versions stay.
# domain_detector data parallel (issue #15): one process draws and computes exactly as before, so version 1 stays.
BUILTIN = (("domain_detector", 1, True),
           ("fid_ref", 1, True), ("ssl_backbone", 1, True), ("reference", 3, True), ("teacher", 3, True),
           ("tokenizer", 2, True), ("recon_eval", 1, True), ("latent_cache", 1, True), ("generator", 3, True),
           # gen_eval 2: sharded over ranks (eval.shard_size), each shard seeded by (seed, shard index),
           # sampled, decoded and scored on the device; other samples than version 1's.
           ("gen_eval", 2, True))
for _name, _version, _ddp in BUILTIN:
    register_stage(_name, _version, f"benchmark.stages.{_name}", distributed=_ddp)

# Display order (status, SLURM resource sections): built-ins in pipeline order, then plug-ins'.
ORDER = tuple(name for name, _, _ in BUILTIN)


def stage_names() -> tuple[str, ...]:
    """Every registered stage kind (plug-ins' included), built-ins first in pipeline order."""
    return ORDER + tuple(n for n in STAGES.names() if n not in ORDER)


def runner(stage: str) -> Callable:
    """The ``run(node)`` of a stage kind; an unknown kind lists the known ones."""
    return STAGES.get(stage).run
