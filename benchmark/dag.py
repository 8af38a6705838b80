"""The stage DAG of a grid: which stages each cell needs, keyed by content.

A node's key is ``<stage>-<hash>`` of the config slice that stage reads plus its inputs' keys,
so two cells that share a prior share its ``reference`` (and ``teacher``) node, every cell
shares ``fid_ref``, and changing any upstream setting gives new directories downstream. Stage
versions live with the stage kinds (benchmark/stages/__init__.py, benchmark.upstream.STAGES).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import benchmark.stages
from benchmark.store import stable_hash
from benchmark.upstream import PIPELINE, STAGES, Need, StageOf, data_slice, declared

# Importing benchmark.stages registers the built-in stage kinds; plug-ins add theirs.
BUILTIN_STAGES = benchmark.stages.ORDER


@dataclass
class Node:
    stage: str
    key: str
    slice: dict[str, Any]           # the hashed config slice
    deps: dict[str, "Node"]         # role -> upstream node
    cfg: dict[str, Any]             # the full resolved config of the first cell that needs it
    run_root: Path
    cells: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # the slice as declared (with intervals, docs)

    @property
    def dir(self) -> Path:
        return self.run_root / "stages" / self.stage / self.key

    @property
    def record_path(self) -> Path:
        return self.dir / "record.json"

    def done(self) -> bool:
        return self.record_path.exists()


def latent_shape(cfg: dict[str, Any]) -> tuple[int, int, int]:
    from tokenizers import latent_side  # one rule for conv, ViT and backbone encoders
    tok = cfg["tokenizer"]
    side = latent_side(tok, int(cfg["dataset"]["resolution"]))
    return (int(tok["latent_channels"]), side, side)


# Documentation-only keys: editing a preset's prose must not invalidate finished runs.
DOC_KEYS = frozenset({"reproduces", "description", "epochs", "label"})


# Checkpoint intervals of the teacher (loss.teacher_checkpoint_every), the offline MAE
# (prior.backbone.train.checkpoint_every) and stage 1 of feature priors
# (prior.stage1.checkpoint_every) say how often a stage saves, not what it computes (resume is
# bit-exact: tests/test_stage_resume.py), so changing one must not orphan finished runs. The
# tokenizer's and generator's own checkpoint_every have always been in their keys and stay
# there, so existing run directories keep their names.
def _is_interval(key: str, parent: str | None) -> bool:
    return key == "teacher_checkpoint_every" or (key == "checkpoint_every" and parent in ("stage1", "train"))


# torch.compile switches (tokenizer.compile, loss.compile, generator.compile, eval.compile) say how
# a stage computes, not what: compiled kernels fuse the same operations and differ from eager only
# in float rounding, as another world size does (not in any key either). A run may resume with
# the switch flipped, and turning it on must not orphan finished runs.
HOW_KEYS = frozenset({"compile"})


# The generator's scale keys (issue #15, benchmark/settings.py GeneratorSettings). grad_accum and
# activation_checkpointing say how a rank computes its share of the global batch, not what: the
# results equal the plain run up to float-sum order (tests/test_generator_scale.py), as with
# another world size, which is not in the key either; so a run may resume with other values.
# precision changes what is computed; it enters the key only when it is not fp32, the behaviour
# before the key existed, so existing run directories keep their names.
GENERATOR_HOW = frozenset({"grad_accum", "activation_checkpointing", *HOW_KEYS})


def _generator_slice(gen: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in gen.items() if k not in GENERATOR_HOW and not (k == "precision" and v == "fp32")}


def _strip_docs(obj: Any, parent: str | None = None) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_docs(v, k) for k, v in obj.items()
                if k not in DOC_KEYS and k not in HOW_KEYS and not _is_interval(k, parent)}
    if isinstance(obj, list):
        return [_strip_docs(v) for v in obj]
    return obj


class DagBuilder:
    """Nodes of the pipeline every cell runs, plus the upstream stages its prior and matching
    loss declare (``upstream(cfg)``, benchmark/upstream.py). Nothing here names a prior or a
    loss: difftraj's kl tokenizer, the offline MAE's training stage and the dm teacher come in
    through that one mechanism, as a third-party plug-in's stage would."""

    def __init__(self, run_root: Path) -> None:
        self.run_root = Path(run_root)
        self.nodes: dict[str, Node] = {}

    def _node(self, stage: str, cfg: dict, params: dict, deps: dict[str, Node], cell: Any) -> Node:
        slc = _strip_docs(params)
        key_src = {"v": STAGES.get(stage).version, "slice": slc, "deps": {r: n.key for r, n in deps.items()}}
        key = f"{stage}-{stable_hash(key_src)}"
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(stage, key, slc, deps, cfg, self.run_root, params=params)
        if cell.label not in node.cells:
            node.cells.append(cell.label)
        return node

    def _needs(self, needs: dict[str, Need | StageOf], c: dict, cell: Any, own: dict[str, Node],
               who: str) -> dict[str, Node]:
        """Nodes for a plug-in's declared needs: its own stages (keyed by their params and the
        pipeline nodes they run after) and stages of other cells' pipelines."""
        out: dict[str, Node] = {}
        for role, need in needs.items():
            if role in PIPELINE:
                raise ValueError(f"{who}: upstream role {role!r} is a pipeline stage's name; choose another")
            if isinstance(need, StageOf):
                if need.stage not in ("reference", "tokenizer", "latent_cache"):
                    raise ValueError(f"{who}: StageOf({need.stage!r}): only a cell's reference, tokenizer or "
                                     f"latent_cache can be shared this way")
                out[role] = self._tokenizer_chain(need.cfg, cell)[need.stage]
                continue
            STAGES.get(need.stage)  # an unknown stage kind lists the known ones
            if need.stage in PIPELINE:
                raise ValueError(f"{who}: Need({need.stage!r}) would add a second {need.stage} to the cell; "
                                 f"use StageOf({need.stage!r}, <cell config>) for another cell's")
            missing = [r for r in need.after if r not in own]
            if missing:
                raise ValueError(f"{who}: stage {need.stage!r} runs after {missing}, which are not "
                                 f"available at this point (available: {sorted(own)})")
            out[role] = self._node(need.stage, c, need.params, {r: own[r] for r in need.after}, cell)
        return out

    def _tokenizer_chain(self, c: dict, cell: Any) -> dict[str, Node]:
        """[prior's upstream ->] reference -> [loss's upstream ->] tokenizer -> latent_cache."""
        from benchmark.settings import GeneratorSettings
        from priors import LOSSES, PRIORS
        out: dict[str, Node] = {}
        shape = latent_shape(c)
        prior_needs = declared(PRIORS.get(c["prior"]["name"]), c)
        ref_deps = self._needs(prior_needs, c, cell, out, f"prior {c['prior']['name']!r}")
        # The cell's own upstream stages appear in its stage map under their stage name (tables
        # time them, status lists them); another cell's pipeline stage (StageOf) belongs to that cell.
        out.update({n.stage: n for r, n in ref_deps.items() if isinstance(prior_needs[r], Need)})
        out["reference"] = self._node("reference", c, {"data": data_slice(c), "prior": c["prior"],
                                                       "latent_shape": shape}, ref_deps, cell)
        loss_needs = declared(LOSSES.get(c["loss"]["name"]), c)
        tok_deps = {"reference": out["reference"],
                    **self._needs(loss_needs, c, cell, out, f"loss {c['loss']['name']!r}")}
        out.update({tok_deps[r].stage: tok_deps[r] for r, need in loss_needs.items() if isinstance(need, Need)})
        out["tokenizer"] = self._node("tokenizer", c, {"data": data_slice(c), "tokenizer": c["tokenizer"],
                                                       "prior": c["prior"], "loss": c["loss"],
                                                       "seed": cell.seed}, tok_deps, cell)
        # The generator's training latents, encoded once: keyed by the tokenizer, the images
        # (generator.train_images drawn by subset() with the cell seed) and the shard layout.
        gen = c["generator"]
        out["latent_cache"] = self._node("latent_cache", c, {"train_images": gen["train_images"], "seed": cell.seed,
                                                             "shard_size": GeneratorSettings.from_dict(
                                                                 gen, "generator").cache_shard_size},
                                         {"tokenizer": out["tokenizer"]}, cell)
        return out

    def add_cell(self, cell: Any) -> dict[str, Node]:
        from benchmark.settings import EvalSettings
        c = cell.cfg
        ev = c["eval"]
        typed = EvalSettings.from_dict(ev, "eval")
        detector = {"detector": ev["detector"], "extra_detectors": ev.get("extra_detectors", []),
                    "precision": ev["precision"]}
        out: dict[str, Node] = {}
        # The domain detector (eval.domain) is keyed by the data and its training settings only,
        # not the cell seed: every cell of a dataset shares one trained classifier. Its counts
        # (n_ref, n_samples, ...) enter the keys of the eval stages that use them.
        dom, on = typed.domain, typed.domain.enabled
        domain_dep: dict[str, Node] = {}
        if on:
            train = {k: getattr(dom, k) for k in ("width", "feature_dim", "steps", "batch_size", "lr", "weight_decay",
                                                  "warmup_steps", "shift", "flip", "precision", "seed")}
            out["domain_detector"] = self._node("domain_detector", c, {"data": data_slice(c), "train": train},
                                                {}, cell)
            domain_dep = {"domain_detector": out["domain_detector"]}
        # Optional keys enter a hash only when set, so a feature left off keeps the old keys.
        boot = {"bootstrap": typed.bootstrap} if typed.bootstrap > 0 else {}
        # fid_ref also measures the real-vs-real floors at the counts the eval stages use.
        floor = {"n": ev["n_samples"], "kid": ev["kid_subset_size"]}
        dom_ref = {"domain": {"n_ref": dom.n_ref, "n": dom.n_samples, "snapshot_n": dom.snapshot_n_samples,
                              "kid": dom.kid_subset_size}} if on else {}
        out["fid_ref"] = self._node("fid_ref", c, {"data": data_slice(c), "split": "test", "n": ev["n_ref"],
                                                   **detector, "floor": floor, **dom_ref}, domain_dep, cell)
        out.update(self._tokenizer_chain(c, cell))
        out["recon_eval"] = self._node("recon_eval", c, {"n": ev["n_ref"], "kid": ev["kid_subset_size"], **detector,
                                                         **boot, **({"domain": {"n_ref": dom.n_ref}} if on else {})},
                                       {"tokenizer": out["tokenizer"], "fid_ref": out["fid_ref"], **domain_dep}, cell)
        # The generator reads its latents from the cache (which is keyed by the tokenizer). Whether
        # it also trains on the flipped views (dataset.hflip) enters its key only when set.
        hflip = {"hflip": True} if c["dataset"].get("hflip", False) else {}
        out["generator"] = self._node("generator", c, {"generator": _generator_slice(c["generator"]), "seed": cell.seed,
                                                       "num_classes": c["dataset"]["num_classes"], **hflip},
                                      {"latent_cache": out["latent_cache"]}, cell)
        out["gen_eval"] = self._node("gen_eval", c, {"n": ev["n_samples"], "sampler": ev["sampler"],
                                                     "kid": ev["kid_subset_size"],
                                                     # optional keys enter the hash only when set
                                                     **{k: ev[k] for k in ("labels", "ref_npz", "save_npz")
                                                        if ev.get(k)},
                                                     # the shard is the sampler's batch: it changes the samples
                                                     "shard_size": typed.shard_size,
                                                     "seed": cell.seed, **detector, **boot,
                                                     **({"domain": {"n": dom.n_samples, "snapshot_n":
                                                                    dom.snapshot_n_samples,
                                                                    "kid": dom.kid_subset_size}} if on else {})},
                                     {"generator": out["generator"], "tokenizer": out["tokenizer"],
                                      "fid_ref": out["fid_ref"], **domain_dep}, cell)
        return out


def build(cells: list[Any], run_root: Path) -> tuple[list[Node], list[dict[str, Node]]]:
    """All unique nodes in a valid execution order, and each cell's stage -> node map."""
    b = DagBuilder(run_root)
    per_cell = [b.add_cell(cell) for cell in cells]
    order: list[Node] = []
    seen: set[str] = set()

    def visit(n: Node) -> None:
        if n.key in seen:
            return
        for d in n.deps.values():
            visit(d)
        seen.add(n.key)
        order.append(n)

    for m in per_cell:
        for n in m.values():
            visit(n)
    return order, per_cell


def longest_chains(deps: Mapping[str, Iterable[str]], cost: Mapping[str, float]) -> dict[str, float]:
    """For each key of ``deps`` (key -> the keys it depends on), its own cost plus the costliest
    chain of stages that depend on it: the work still to run one after another from its start to
    the end of the graph. Dependencies outside ``deps`` are ignored (finished elsewhere)."""
    children: dict[str, list[str]] = {k: [] for k in deps}
    for k, ds in deps.items():
        for d in ds:
            if d in children:
                children[d].append(k)
    memo: dict[str, float] = {}

    def longest(k: str) -> float:
        if k not in memo:
            memo[k] = cost[k] + max((longest(c) for c in children[k]), default=0.0)
        return memo[k]

    return {k: longest(k) for k in deps}
