"""The stage DAG of a grid: which stages each cell needs, keyed by content.

A node's key is ``<stage>-<hash>`` of the config slice that stage reads plus its inputs' keys,
so two cells that share a prior share its ``reference`` (and ``teacher``) node, every cell
shares ``fid_ref``, and changing any upstream setting gives new directories downstream.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import Cell
from benchmark.store import stable_hash

# Bump when a stage's outputs change meaning, so old run directories are not reused.
# teacher 2: its network is seeded before it is built (version 1 started from whatever state the
# worker process's RNG was in, so its runs are not reproducible and must not be reused).
STAGE_VERSION = {"fid_ref": 1, "ssl_backbone": 1, "reference": 2, "teacher": 2, "tokenizer": 1, "recon_eval": 1,
                 "generator": 2, "gen_eval": 1}
STAGES = tuple(STAGE_VERSION)


@dataclass
class Node:
    stage: str
    key: str
    slice: dict[str, Any]           # the hashed config slice
    deps: dict[str, "Node"]         # role -> upstream node
    cfg: dict[str, Any]             # the full resolved config of the first cell that needs it
    run_root: Path
    cells: list[str] = field(default_factory=list)

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


def _data_slice(cfg: dict[str, Any]) -> dict[str, Any]:
    d = cfg["dataset"]
    return {"name": d["name"], "resolution": d["resolution"]}


def needs_trained_teacher(cfg: dict[str, Any]) -> bool:
    if cfg["loss"]["name"] != "dm":
        return False
    mode = cfg["loss"].get("teacher", "auto")
    if mode == "trained":
        return True
    from priors import PRIORS, has_exact_velocity
    has_exact = has_exact_velocity(PRIORS.get(cfg["prior"]["name"]))
    if mode == "exact" and not has_exact:
        raise ValueError(f"loss.teacher=exact but prior {cfg['prior']['name']!r} has no closed-form score; "
                         f"use loss.teacher=trained or auto")
    return not has_exact


def _bank_cfg(prior: dict[str, Any]) -> dict[str, Any]:
    """The prior that does the fitting: the prior itself, or a subset prior's base."""
    return prior.get("base") or prior if prior.get("name") == "subset" else prior


def ssl_backbone_cfg(prior: dict[str, Any]) -> dict[str, Any] | None:
    """The backbone config when the suite must train it first (offline-mae), else None."""
    bb = _bank_cfg(prior).get("backbone")
    return bb if isinstance(bb, dict) and bb.get("name") == "offline-mae" else None


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


def _strip_docs(obj: Any, parent: str | None = None) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_docs(v, k) for k, v in obj.items() if k not in DOC_KEYS and not _is_interval(k, parent)}
    if isinstance(obj, list):
        return [_strip_docs(v) for v in obj]
    return obj


class DagBuilder:
    def __init__(self, run_root: Path) -> None:
        self.run_root = Path(run_root)
        self.nodes: dict[str, Node] = {}

    def _node(self, stage: str, cfg: dict, slc: dict, deps: dict[str, Node], cell: Cell) -> Node:
        slc = _strip_docs(slc)
        key_src = {"v": STAGE_VERSION[stage], "slice": slc, "deps": {r: n.key for r, n in deps.items()}}
        key = f"{stage}-{stable_hash(key_src)}"
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(stage, key, slc, deps, cfg, self.run_root)
        if cell.label not in node.cells:
            node.cells.append(cell.label)
        return node

    def _tokenizer_chain(self, c: dict, cell: Cell) -> dict[str, Node]:
        """ssl_backbone (when needed) -> reference -> teacher (when needed) -> tokenizer."""
        out: dict[str, Node] = {}
        shape = latent_shape(c)
        ref_deps: dict[str, Node] = {}
        if (bb := ssl_backbone_cfg(c["prior"])) is not None:
            out["ssl_backbone"] = self._node("ssl_backbone", c, {"data": _data_slice(c), "backbone": {
                k: v for k, v in bb.items() if k != "checkpoint"}}, {}, cell)
            ref_deps["ssl_backbone"] = out["ssl_backbone"]
        bank = _bank_cfg(c["prior"])
        if bank.get("name") == "difftraj":
            # The plain tokenizer whose noisy latents are the reference: same presets and seed,
            # the base loss (kl) and prior; shared with the sweep's kl cell when it has one.
            base = {**c, "prior": bank["base_prior"], "loss": bank["base_loss"]}
            ref_deps["base_tokenizer"] = self._tokenizer_chain(base, cell)["tokenizer"]
        out["reference"] = self._node("reference", c, {"data": _data_slice(c), "prior": c["prior"],
                                                       "latent_shape": shape}, ref_deps, cell)
        tok_deps = {"reference": out["reference"]}
        if needs_trained_teacher(c):
            loss = c["loss"]
            t_slice = {k: loss[k] for k in ("score_net", "score_net_args", "teacher_steps",
                                            "teacher_batch_size", "teacher_lr")}
            t_slice["num_classes"] = c["dataset"]["num_classes"]
            out["teacher"] = self._node("teacher", c, {**t_slice, "seed": cell.seed},
                                        {"reference": out["reference"]}, cell)
            tok_deps["teacher"] = out["teacher"]
        out["tokenizer"] = self._node("tokenizer", c, {"data": _data_slice(c), "tokenizer": c["tokenizer"],
                                                       "prior": c["prior"], "loss": c["loss"],
                                                       "seed": cell.seed}, tok_deps, cell)
        return out

    def add_cell(self, cell: Cell) -> dict[str, Node]:
        c = cell.cfg
        ev = c["eval"]
        detector = {"detector": ev["detector"], "extra_detectors": ev.get("extra_detectors", []),
                    "precision": ev["precision"]}
        out: dict[str, Node] = {}
        out["fid_ref"] = self._node("fid_ref", c, {"data": _data_slice(c), "split": "test",
                                                   "n": ev["n_ref"], **detector}, {}, cell)
        out.update(self._tokenizer_chain(c, cell))
        out["recon_eval"] = self._node("recon_eval", c, {"n": ev["n_ref"], "kid": ev["kid_subset_size"], **detector},
                                       {"tokenizer": out["tokenizer"], "fid_ref": out["fid_ref"]}, cell)
        out["generator"] = self._node("generator", c, {"generator": c["generator"], "seed": cell.seed,
                                                       "num_classes": c["dataset"]["num_classes"]},
                                      {"tokenizer": out["tokenizer"]}, cell)
        out["gen_eval"] = self._node("gen_eval", c, {"n": ev["n_samples"], "sampler": ev["sampler"],
                                                     "kid": ev["kid_subset_size"],
                                                     # optional keys enter the hash only when set
                                                     **{k: ev[k] for k in ("labels", "ref_npz") if ev.get(k)},
                                                     "seed": cell.seed, **detector},
                                     {"generator": out["generator"], "tokenizer": out["tokenizer"],
                                      "fid_ref": out["fid_ref"]}, cell)
        return out


def build(cells: list[Cell], run_root: Path) -> tuple[list[Node], list[dict[str, Node]]]:
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
