"""The resources of one stage's SLURM job: the launcher config's defaults, overridden per stage
(``launcher.stages.<stage>.<key>``; null inherits). Shared by the launcher, which submits with
them, and the plan, which prices them, so that neither imports the other."""
from __future__ import annotations

RESOURCES = ("partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task", "mem_gb",
             "timeout_min", "nodes", "tasks_per_node")


def stage_resources(cfg: dict, stage: str) -> dict:
    own = (cfg.get("stages") or {}).get(stage) or {}
    return {k: own[k] if own.get(k) is not None else cfg.get(k) for k in RESOURCES}
