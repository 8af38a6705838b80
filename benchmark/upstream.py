"""What a cell needs before a stage can run, declared by the plug-ins themselves.

The stage DAG (benchmark/dag.py) knows only the pipeline every cell runs:

    fid_ref -> reference -> tokenizer -> recon_eval
                               \\-> latent_cache -> generator -> gen_eval

Everything else comes from the cell's plug-ins, through two class methods:

- a prior's ``upstream(cfg) -> {role: Need | StageOf}``: the stages its ``reference`` stage needs
  (feature priors on the offline MAE: the ``ssl_backbone`` stage that trains it; difftraj: the
  plain kl tokenizer of the same presets). ``prior.fit(ctx)`` finds their outputs in
  ``ctx.inputs[role]``.
- a matching loss's ``upstream(cfg)``: the stages its ``tokenizer`` stage needs (dm: a trained
  ``teacher`` when the prior has no exact score). ``Loss.from_config(..., inputs=...)`` gets
  their outputs.

A ``Need`` is a stage of this cell (its key hashes ``params``, so cells that need the same
thing share one run); a ``StageOf`` is the node a pipeline stage has for another cell config
(difftraj's kl tokenizer is the kl cell's tokenizer when the sweep has that cell).

Stage kinds are a registry like priors (``STAGES``; third-party kinds through the entry-point
group ``dmvae_bench.stages``). A stage kind is a module with ``run(node) -> dict`` (the facts
for its record) and, optionally, ``output(node)``: what dependants receive (default: its
directory). This module is part of the bottom layer: plug-in packages import it, it imports
nothing of the runner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from benchmark.registry import Registry

PIPELINE = ("fid_ref", "reference", "tokenizer", "recon_eval", "latent_cache", "generator", "gen_eval")


@dataclass(frozen=True)
class StageKind:
    name: str
    version: int        # bump when the stage's outputs change meaning: old run directories are not reused
    module: str         # exposes run(node) -> dict and optionally output(node)
    distributed: bool = False   # may run on several ranks (torchrun / srun tasks)
    doc: str = ""

    def _module(self):
        return import_module(self.module)

    def run(self, node: Any) -> dict:
        return self._module().run(node)

    def output(self, node: Any) -> Any:
        """What a dependant stage receives from a finished ``node`` of this kind."""
        fn = getattr(self._module(), "output", None)
        return fn(node) if fn is not None else Path(node.dir)


STAGES: Registry[StageKind] = Registry("stage")


def register_stage(name: str, version: int, module: str, distributed: bool = False, doc: str = "") -> StageKind:
    """Register a stage kind; a plug-in package calls this at import (its module is named in the
    entry-point group ``dmvae_bench.stages`` or in ``plugins=[...]``)."""
    kind = StageKind(name, int(version), module, bool(distributed), doc)
    return STAGES.register(name)(kind)


@dataclass(frozen=True)
class Need:
    """A stage this cell needs. ``params`` is the config slice the stage reads (hashed into its
    key, minus documentation keys and checkpoint intervals); the stage finds it in
    ``node.params``. ``after`` names pipeline roles of the same cell it depends on (e.g.
    ``("reference",)``: the dm teacher trains on the prior the reference stage fitted)."""
    stage: str
    params: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageOf:
    """The node the pipeline stage ``stage`` has for another cell config ``cfg`` (same run
    root), e.g. the tokenizer of a kl cell with the same presets and seed."""
    stage: str
    cfg: dict


def data_slice(cfg: dict) -> dict:
    """The dataset settings every stage that reads images hashes (name and resolution; plus the
    root of a ``folder`` dataset, whose name says nothing of its images, and the settings that
    change pixels when they are on: flips, DCT-scaled JPEG decode). Off, they add nothing, so the
    keys of existing runs do not change."""
    d = cfg["dataset"]
    out = {"name": d["name"], "resolution": d["resolution"]}
    if d["name"] == "folder":
        out["root"] = d.get("root")
    out.update({k: True for k in ("hflip", "jpeg_draft") if d.get(k)})
    return out


def declared(plugin: Any, cfg: dict) -> dict[str, Need | StageOf]:
    """A plug-in class's ``upstream(cfg)``, or nothing when it declares none."""
    fn = getattr(plugin, "upstream", None)
    needs = dict(fn(cfg) or {}) if callable(fn) else {}
    for role, need in needs.items():
        if not isinstance(need, (Need, StageOf)):
            raise TypeError(f"{getattr(plugin, '__name__', plugin)}.upstream: role {role!r} must map to a "
                            f"Need or StageOf, got {type(need).__name__}")
    return needs
