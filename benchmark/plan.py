"""``python -m benchmark.grid <overrides> --plan``: what a sweep will run and what it will cost,
before anything is submitted.

Every stage job of the sweep is listed with its cells, the resources its launcher gives it,
its dependencies and whether it is done (its record exists), shared by several cells, or still
to run. Its cost comes from a model, not a guess:

    FLOPs = (FLOPs of one sample through each model it runs) x (samples per step) x steps
    GPU-hours = FLOPs / (GPU peak of the precision it runs in x utilisation) / 3600

The FLOPs of one sample are counted from the models themselves with torch's FlopCounterMode on
the meta device (no weights, no memory), as ``benchmark.perf`` counts them, so a preset's widths,
depths and resolutions enter without a table of ours. FlopCounterMode counts a multiply-add as
2 FLOPs: LightningDiT-XL/1 on 16x16x32 latents counts 237 GFLOPs a forward, twice the 118.6
"GFLOPs" (multiply-adds) the DiT paper gives for DiT-XL/2 at the same 256 tokens
(../shared/reference/PAPER_SCALE.md). A training step counts 3 forwards (forward + backward).

The utilisation (model-FLOPs utilisation, MFU) is an assumption until a GPU has measured it:
0.40 by default, inside the 35-50% that well-tuned ViT/DiT bf16 training reaches on A100/H100
(PAPER_SCALE.md). ``--mfu`` overrides it; a ``results/perf/gpu-<name>.json`` written by
scripts/gpu_check.sh with a measured ``mfu`` replaces it, and the plan says which it used.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark.dag import Node, latent_shape
from benchmark.job_resources import stage_resources
from benchmark.store import write_json, write_text

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Dense peaks in TFLOP/s by precision (PAPER_SCALE.md "GPUs"; TF32 for fp32 work, as the
# stages enable TF32 matmuls on CUDA).
GPU_PEAKS = {"h100": {"bf16": 989.0, "fp32": 495.0},
             "h200": {"bf16": 989.0, "fp32": 495.0},
             "a100": {"bf16": 312.0, "fp32": 156.0}}
DEFAULT_GPU = "h100"
DEFAULT_MFU = 0.40
# Time limit = estimated wall time x this margin (rounded up to 30 min), so a profile need not
# guess limits: model error, evaluation pauses and checkpoint writes fit inside it.
LIMIT_MARGIN = 1.5
# The Inception-v3 of FID at 299 px: 5.7 G multiply-adds (Szegedy et al. 2016, Table 3), used
# only when the detector cannot be built here to be counted.
INCEPTION_FWD_FLOPS = 2 * 5.7e9


# ------------------------------------------------------------------ FLOPs of one sample
def _count(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def _architecture_only(cfg: dict) -> dict:
    """The cell's config with every pretrained-weight switch off: counting FLOPs needs the
    architecture, not the weights (which may not be on this machine)."""
    c = copy.deepcopy(cfg)

    def walk(d: Any) -> None:
        if isinstance(d, dict):
            if "pretrained" in d:
                d["pretrained"] = False
            d.pop("checkpoint", None)
            for v in d.values():
                walk(v)
        elif isinstance(d, list):
            for v in d:
                walk(v)
    walk(c["tokenizer"])
    return c


class SampleFlops:
    """Forward FLOPs of one sample through each model of a cell, counted once per config."""

    def __init__(self) -> None:
        self._memo: dict[str, Any] = {}

    def _once(self, key: str, fn: Callable[[], Any], missing: Any = float("nan")) -> Any:
        """fn() counted once per key; ``missing`` (nan: left out of totals) when the model
        cannot be built here, with a warning that says so."""
        if key not in self._memo:
            try:
                self._memo[key] = fn()
            except Exception as exc:
                log.warning("plan: could not count %s (%s); its cost is left out", key.split("|")[0], exc)
                self._memo[key] = missing
        return self._memo[key]

    def tokenizer(self, cfg: dict) -> tuple[float, float]:
        """(encoder, decoder) forward FLOPs of one image."""
        from benchmark.stages.common import build_tokenizer_for, dataset_settings

        def count() -> tuple[float, float]:
            d = dataset_settings(cfg)
            arch = _architecture_only(cfg)
            with torch.device("meta"):
                # With the stage-1 design the DM stage's tokenizer is the prior's stage-1 model.
                tok = build_tokenizer_for(arch, _stage1_architecture(arch) if _stage1_start(cfg) else None)
                x = torch.zeros(1, d.channels, d.resolution, d.resolution)
                enc = _count(lambda: tok.encode(x))
                z = torch.zeros(1, *latent_shape(cfg))
                dec = _count(lambda: tok.decode(z))
            return enc, dec
        # The prior too: with the stage-1 design the encoder is the prior's backbone and MLP.
        key = "tokenizer|" + json.dumps([cfg["tokenizer"], cfg["dataset"], cfg["prior"]], sort_keys=True, default=str)
        return self._once(key, count, missing=(float("nan"), float("nan")))

    def _dit(self, cfg: dict, build: Callable[[], torch.nn.Module], what: str, spec: Any) -> float:
        def count() -> float:
            with torch.device("meta"):
                net = build()
                z = torch.zeros(1, *latent_shape(cfg))
                return _count(lambda: net(z, torch.zeros(1), torch.zeros(1, dtype=torch.long)))
        return self._once(f"{what}|" + json.dumps([spec, latent_shape(cfg)], sort_keys=True, default=str), count)

    def generator(self, cfg: dict) -> float:
        from benchmark.stages.generator import build_model
        return self._dit(cfg, lambda: build_model(cfg), "generator", cfg["generator"])

    def score_net(self, cfg: dict) -> float:
        from benchmark.stages.common import build_score_net
        loss = cfg["loss"]
        return self._dit(cfg, lambda: build_score_net(cfg), "score_net",
                         [loss.get("score_net"), loss.get("score_net_args")])

    def detector(self, cfg: dict) -> float:
        def count() -> float:
            from benchmark.metrics import build_detector
            try:
                det = build_detector(cfg["eval"]["detector"], "fp32")
            except Exception as exc:  # no weights file here: the published figure
                log.info("plan: detector not built here (%s); %.1f GFLOPs a forward (Inception-v3)", exc,
                         INCEPTION_FWD_FLOPS / 1e9)
                return INCEPTION_FWD_FLOPS
            # One real image through the real network (its own resize included): about 0.1 s.
            return _count(lambda: det.features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), batch_size=1))
        return self._once("detector|" + str(cfg["eval"]["detector"]), count)

    def domain_net(self, cfg: dict) -> float:
        """The domain detector's classifier: forward FLOPs of one image (its centre crop)."""
        from benchmark.metrics.domain import DomainNet
        from benchmark.stages.common import dataset_settings
        from benchmark.stages.domain_detector import crop_side, settings

        def count() -> float:
            d, ds = dataset_settings(cfg), settings(cfg)
            side = crop_side(d.resolution, ds)
            with torch.device("meta"):
                net = DomainNet(d.channels, d.num_classes, ds.width, side, ds.feature_dim).eval()
                return _count(lambda: net(torch.zeros(1, d.channels, side, side)))
        return self._once("domain|" + json.dumps([cfg["eval"]["domain"], cfg["dataset"]], sort_keys=True,
                                                 default=str), count)

    def mae(self, cfg: dict, backbone: dict, mask_ratio: float) -> float:
        """The offline MAE's training loss (encoder on the visible patches, decoder on all):
        forward FLOPs of one image at ``mask_ratio``."""
        from backbones.offline_mae import MAE
        from benchmark.stages.common import dataset_settings

        def count() -> float:
            size = int(backbone.get("img_size", dataset_settings(cfg).resolution))
            with torch.device("meta"):
                mae = MAE(img_size=size, **(backbone.get("arch") or {}))
                x, noise = torch.zeros(1, 3, size, size), torch.zeros(1, mae.num_patches)
                return _count(lambda: mae.loss(x, mask_ratio, noise=noise))
        return self._once("mae|" + json.dumps([backbone, mask_ratio], sort_keys=True, default=str), count)


# ------------------------------------------------------------------ per-stage cost
@dataclass
class StageCost:
    flops: float          # nan = not modelled
    precision: str        # the peak it is measured against
    note: str


def _stage1_prior(cfg: dict) -> dict | None:
    """The prior section that has a stage 1: the cell's own, or its base's (a class subset of a
    feature prior is fitted as its base is); None for priors without one."""
    p = cfg["prior"]
    p = p["base"] if isinstance(p.get("base"), dict) else p
    return p if p.get("stage1") else None


def _stage1_start(cfg: dict) -> bool:
    """Does the DM stage start from the reference stage's stage-1 model (tokenizer.design)?"""
    return str(cfg["tokenizer"].get("design", "preset")) == "stage1" and _stage1_prior(cfg) is not None


def _stage1_settings(cfg: dict) -> dict:
    """The prior's stage-1 settings with their defaults, as the feature prior reads them."""
    from priors.features import STAGE1_DEFAULTS
    return {**STAGE1_DEFAULTS, **_stage1_prior(cfg)["stage1"]}


def _stage1_architecture(cfg: dict) -> dict:
    """The tokenizer section of the stage-1 model from the config alone, for counting: the one
    priors.features.FeaturePrior.stage1_architecture builds after the reference stage, with
    random weights."""
    from priors.features import FeaturePrior
    s1 = _stage1_settings(cfg)
    return FeaturePrior.stage1_tokenizer({**_stage1_prior(cfg)["backbone"], "pretrained": False}, s1["decoder"],
                                         latent_shape(cfg), int(s1["hidden"]))


def _dm_cfg_scale(cfg: dict) -> float:
    """The DM CFG scale the cell's prior gets (priors/losses/dm.py: 1 without labels or for a
    class subset), from the prior's registered class."""
    from priors import LOSSES, PRIORS
    p = cfg["prior"]
    return LOSSES.get("dm").effective_cfg_scale(float(cfg["loss"].get("cfg_scale", 1.0)), PRIORS.get(p["name"]),
                                               p.get("classes"))


def _bf16(section: dict) -> str:
    return "bf16" if str(section.get("precision", "fp32")) == "bf16" else "fp32"


def stage_cost(node: Node, fl: SampleFlops) -> StageCost:
    """The FLOPs a stage's job will compute, from its config; nan where no model exists."""
    cfg, s = node.cfg, node.stage
    ev, tc, gc, loss = cfg["eval"], cfg["tokenizer"], cfg["generator"], cfg["loss"]
    if s == "tokenizer":
        enc, dec = fl.tokenizer(cfg)
        # With the stage-1 design a feature prior's reference stage was the warm-up (stage 1).
        warm = 0 if _stage1_start(cfg) else int(tc.get("warmup_iters", 0))
        fin, match = int(tc.get("finetune_iters", 0)), int(tc.get("match_iters", 0))
        bs = int(tc["batch_size"])
        # A frozen encoder (the warm-up with warmup_frozen_encoder, the decoder fine-tune) runs
        # forward only; its bottleneck MLP, which the warm-up trains, is counted with it.
        warm_enc = 1 if tc.get("warmup_frozen_encoder") else 3
        flops = ((warm_enc * enc + 3 * dec) * warm + (enc + 3 * dec) * fin) * bs
        note = (f"{warm + match + fin:,} iterations x {bs} images (warm-up {warm:,}"
                f"{', encoder frozen' if warm_enc == 1 else ''}; decoder fine-tune {fin:,}, encoder frozen)")
        if loss["name"] == "dm":
            # The DM phase (benchmark/stages/tokenizer.py, TokenizerRun.iteration): every iteration
            # encodes its batch and updates the fake (3 fwd); every vae_train_every-th iteration
            # is a tokenizer step instead of the plain encode, whose loss runs the fake and the
            # teacher forward (each twice under DM CFG, which priors without labels do not get).
            k, sn = int(loss.get("vae_train_every", 1)), fl.score_net(cfg)
            steps = math.ceil(match / k)
            passes = 2 * (2 if _dm_cfg_scale(cfg) > 1 else 1)
            flops += (3 * (enc + dec) * steps + enc * (match - steps) + sn * (3 * match + passes * steps)) * bs
            note += f"; DM phase {match:,} iterations: {steps:,} tokenizer steps, {match:,} fake updates"
        else:  # every matching-phase iteration is a tokenizer step
            flops += 3 * (enc + dec) * match * bs
        return StageCost(flops, _bf16(tc), note + "; perceptual and GAN losses not counted")
    if s == "teacher":
        steps, bs = int(loss.get("teacher_steps", 0)), int(loss.get("teacher_batch_size", 128))
        return StageCost(3 * fl.score_net(cfg) * bs * steps, "fp32", f"<= {steps:,} steps x {bs} (a ceiling: "
                         "it stops at its plateau)")
    if s == "generator":
        steps, bs = int(gc["steps"]), int(gc["batch_size"])
        # Activation checkpointing recomputes each block's forward during the backward pass.
        fwd = 4 if gc.get("activation_checkpointing") else 3
        return StageCost(fwd * fl.generator(cfg) * bs * steps, _bf16(gc),
                         f"{steps:,} steps x {bs} latents x {fwd} fwd")
    if s == "latent_cache":
        enc, _ = fl.tokenizer(cfg)
        n = int(gc.get("train_images") or 0)
        return StageCost(2 * n * enc, _bf16(tc), f"{n:,} images and their flips through the encoder")
    dom = ev.get("domain") or {}
    if s == "gen_eval":
        sc = ev["sampler"]
        n = max(int(ev["n_samples"]), int(dom.get("n_samples", 0)) if dom.get("enabled") else 0)
        passes = 2 if float(sc.get("cfg_scale", 1.0)) > 1 else 1
        _, dec = fl.tokenizer(cfg)
        per = int(sc["steps"]) * passes * fl.generator(cfg) + dec
        flops = n * per + int(ev["n_samples"]) * fl.detector(cfg)
        note = f"{n:,} samples x {sc['steps']} sampler steps x {passes} pass(es) + decoder + detector"
        if dom.get("enabled"):
            # Every sample through the domain classifier, and each earlier EMA snapshot's own
            # samples through sampler, decoder and classifier (the final EMA's are the main ones).
            snap = int(dom.get("snapshot_n_samples", 0)) * len(gc.get("snapshots") or [])
            dn = fl.domain_net(cfg)
            flops += n * dn + snap * (per + dn)
            note += f"; domain features, {snap:,} snapshot samples"
        return StageCost(flops, _bf16(ev), note)
    if s == "recon_eval":
        enc, dec = fl.tokenizer(cfg)
        n = int(ev["n_ref"])
        flops, note = n * (enc + dec + fl.detector(cfg)), f"{n:,} images: encode, decode, detector"
        if dom.get("enabled"):  # rFD_domain: its own held-out images reconstructed and classified
            nd = int(dom["n_ref"])
            flops += nd * (enc + dec + fl.domain_net(cfg))
            note += f"; {nd:,} more through tokenizer and domain classifier"
        return StageCost(flops, _bf16(ev), note)
    if s == "fid_ref":
        n = int(ev["n_ref"]) + int(ev["n_samples"])  # reference features + the train-split floor
        flops, note = n * fl.detector(cfg), f"{n:,} images through the detector"
        if dom.get("enabled"):  # the domain reference and its train-split floor
            nd = int(dom["n_ref"]) + int(dom["n_samples"])
            flops += nd * fl.domain_net(cfg)
            note += f"; {nd:,} through the domain classifier"
        return StageCost(flops, _bf16(ev), note)
    if s == "domain_detector":
        steps, bs = int(dom["steps"]), int(dom["batch_size"])
        return StageCost(3 * fl.domain_net(cfg) * bs * steps, "bf16" if dom.get("precision") == "bf16" else "fp32",
                         f"{steps:,} steps x {bs} crops x 3 fwd (the test-split accuracy pass not counted)")
    if s == "ssl_backbone":
        from benchmark.stages.ssl_backbone import TRAIN_DEFAULTS
        backbone = node.params["backbone"]
        tr = {**TRAIN_DEFAULTS, **(backbone.get("train") or {})}  # as the stage reads them
        steps, bs = int(tr["steps"]), int(tr["batch_size"])
        return StageCost(3 * fl.mae(cfg, backbone, float(tr["mask_ratio"])) * bs * steps, "fp32",
                         f"offline MAE: {steps:,} steps x {bs} images x 3 fwd (masked encoder + decoder)")
    if s == "reference":
        return _reference_cost(cfg, [d.stage for d in node.deps.values()], fl)
    return StageCost(float("nan"), "fp32", "no cost model for this stage kind")


def _reference_cost(cfg: dict, dep_stages: list[str], fl: SampleFlops) -> StageCost:
    """The reference stage: a closed-form prior fits nothing; a bank of latents read from another
    cell's latent cache (difftraj) runs no network; a prior restricted from a base prior (its
    section under ``base``: the class subset) costs what fitting the base costs; a feature bank
    costs its backbone passes and stage 1."""
    base = cfg["prior"].get("base")
    if isinstance(base, dict):
        inner = _reference_cost({**cfg, "prior": base}, dep_stages, fl)
        return StageCost(inner.flops, inner.precision, f"the base prior's reference ({inner.note}), its bank then "
                         "restricted to the listed classes")
    n = int(cfg["prior"].get("n_images") or 0)
    if not n:
        return StageCost(0.0, "fp32", "closed-form prior: no network")
    if dep_stages and all(d == "latent_cache" for d in dep_stages):
        return StageCost(0.0, "fp32", f"{n:,} rows of another cell's latent cache: no network")
    if not _stage1_start(cfg):
        return StageCost(float("nan"), "bf16", f"{n:,} images through the prior's backbone: not modelled "
                         "unless the tokenizer is the stage-1 model")
    # Stage 1 trains the stage-1 model, which is the tokenizer's architecture with the
    # stage-1 design: the frozen backbone forward, then MLP + decoder forward and backward.
    enc, dec = fl.tokenizer(cfg)
    s1 = _stage1_settings(cfg)
    steps, bs = int(s1["iters"]), int(s1["batch_size"])
    return StageCost(n * enc + steps * bs * (enc + 3 * dec), _bf16(cfg["prior"]),
                     f"{n:,} images through the backbone; stage 1: {steps:,} steps x {bs}")


# ------------------------------------------------------------------ the plan
@dataclass
class PlanRow:
    stage: str
    key: str
    cells: list[str]
    deps: list[str]
    status: str
    resources: dict[str, Any]
    gpus: int
    cost: StageCost
    gpu_hours: float
    wall_hours: float
    limit_min: int
    problems: list[str] = field(default_factory=list)


def utilisation(gpu: str, mfu: float | None) -> tuple[float, str]:
    """(MFU, where it comes from): the user's, else a GPU measurement on record, else ours."""
    if mfu is not None:
        return float(mfu), "given with --mfu"
    measured = PROJECT_ROOT / "results" / "perf" / f"gpu-{gpu}.json"
    if measured.exists():
        data = json.loads(measured.read_text())
        if isinstance(data.get("mfu"), (int, float)):
            return float(data["mfu"]), f"measured ({measured.relative_to(PROJECT_ROOT)})"
    return DEFAULT_MFU, "assumed: 35-50% is what tuned DiT training reaches (PAPER_SCALE.md); not measured here"


def _resources(launcher: dict | None, local: dict, stage: str) -> tuple[dict[str, Any], int, int]:
    """(resources, GPUs, requeues) of a stage's job: ``launcher`` is the resolved SLURM launcher
    config (launch_slurm.resolve), None for the local launcher (``local``: its section)."""
    if launcher is None:
        return {"launcher": "local", "workers": local.get("workers")}, 0, 0
    r = stage_resources(launcher, stage)
    return r, int(r["nodes"]) * int(r["gpus_per_node"] or 0), int(launcher.get("max_requeues", 0))


def build_plan(base: dict, order: list[Node], launcher: dict | None = None, gpu: str = DEFAULT_GPU,
               mfu: float | None = None, missing: list[str] | None = None) -> dict[str, Any]:
    """Rows of every stage job in ``order``; ``missing`` lists data and weights not on this
    machine (config.load collected them instead of refusing the sweep)."""
    if gpu not in GPU_PEAKS:
        raise ValueError(f"unknown GPU {gpu!r} for the cost model; known: {', '.join(sorted(GPU_PEAKS))}")
    u, u_src = utilisation(gpu, mfu)
    fl = SampleFlops()
    rows: list[PlanRow] = []
    for n in order:
        res, gpus, requeues = _resources(launcher, base["launcher"], n.stage)
        cost = stage_cost(n, fl)
        peak = GPU_PEAKS[gpu][cost.precision] * 1e12
        gh = cost.flops / (peak * u) / 3600 if math.isfinite(cost.flops) else float("nan")
        wall = gh / max(gpus, 1)
        limit = int(math.ceil(wall * 60 * LIMIT_MARGIN / 30) * 30) if math.isfinite(wall) else 0
        status = "done" if n.done() else ("to run, shared by %d cells" % len(n.cells) if len(n.cells) > 1
                                          else "to run")
        row = PlanRow(n.stage, n.key, list(n.cells), [d.key for d in n.deps.values()], status, res, gpus,
                      cost, gh, wall, max(limit, 30))
        if res.get("timeout_min") == "auto":
            row.resources = {**res, "timeout_min": f"auto ({row.limit_min})"}
        elif "timeout_min" in res and math.isfinite(wall) and gpus:
            total_min = float(res["timeout_min"]) * (1 + requeues)
            if total_min < wall * 60:
                row.problems.append(f"its time limit ({res['timeout_min']} min x {1 + requeues} runs with "
                                    f"{requeues} requeues) is below the estimate ({wall * 60:,.0f} min)")
        rows.append(row)
    return {"gpu": gpu, "mfu": u, "mfu_source": u_src, "peaks_tflops": GPU_PEAKS[gpu], "rows": rows,
            "missing": list(missing or [])}


def check(plan: dict[str, Any]) -> None:
    """A profile whose limits cannot finish a stage is rejected before any submission."""
    bad = [f"{r.stage} {r.key}: {p}" for r in plan["rows"] if r.status != "done" for p in r.problems]
    if bad:
        raise ValueError("the launcher profile cannot finish these stages: " + "; ".join(bad)
                         + ". Raise timeout_min or launcher.max_requeues for them")


def _fmt_h(h: float) -> str:
    return "n/a" if not math.isfinite(h) else (f"{h:,.1f}" if h >= 0.1 else f"{h:.2g}")


def to_markdown(plan: dict[str, Any], sweep: str) -> str:
    rows: list[PlanRow] = plan["rows"]
    todo = [r for r in rows if r.status != "done"]
    lines = [f"# Plan of {sweep}", "",
             f"Cost model: FLOPs counted from the models x steps / ({plan['gpu']} peak "
             f"{plan['peaks_tflops']['bf16']:.0f} TFLOP/s bf16, {plan['peaks_tflops']['fp32']:.0f} TF32 "
             f"x MFU {plan['mfu']:.2f}, {plan['mfu_source']}).", "",
             "| stage | key | cells | status | resources | GPUs | GFLOPs | GPU-hours | est. wall (h) | limit (min) | what |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = ", ".join(f"{k}={v}" for k, v in r.resources.items() if v not in (None, ""))
        gfl = "n/a" if not math.isfinite(r.cost.flops) else f"{r.cost.flops / 1e9:,.0f}"
        lines.append(f"| {r.stage} | {r.key} | {len(r.cells)} | {r.status} | {res} | {r.gpus} | {gfl} | "
                     f"{_fmt_h(r.gpu_hours)} | {_fmt_h(r.wall_hours)} | {r.limit_min} | {r.cost.note} |")
    per_stage: dict[str, float] = {}
    for r in todo:
        if math.isfinite(r.gpu_hours):
            per_stage[r.stage] = per_stage.get(r.stage, 0.0) + r.gpu_hours
    per_cell: dict[str, float] = {}
    for r in todo:
        if math.isfinite(r.gpu_hours):
            for c in r.cells:  # a shared stage is charged to each of its cells in equal parts
                per_cell[c] = per_cell.get(c, 0.0) + r.gpu_hours / len(r.cells)
    total = sum(per_stage.values())
    lines += ["", "GPU-hours still to run, per stage kind: "
              + ", ".join(f"{k} {_fmt_h(v)}" for k, v in per_stage.items()),
              "", "Per cell (shared stages split evenly): "
              + ", ".join(f"{k} {_fmt_h(v)}" for k, v in per_cell.items()),
              "", f"**Total: {_fmt_h(total)} GPU-hours** to run ({len(todo)} of {len(rows)} stage jobs; "
              f"{sum(1 for r in rows if r.status == 'done')} done)."]
    uncounted = sorted({r.stage for r in todo if not math.isfinite(r.cost.flops)})
    if uncounted:
        lines.append(f"Not in the total (no cost model or not countable here): {', '.join(uncounted)}.")
    if plan.get("missing"):
        lines += ["", "**Not on this machine** (the sweep is refused until they are):"]
        lines += [f"- {m}" for m in plan["missing"]]
    return "\n".join(lines) + "\n"


def write(plan: dict[str, Any], sweep_dir: Path) -> str:
    md = to_markdown(plan, sweep_dir.name)
    rows = [{"stage": r.stage, "key": r.key, "cells": r.cells, "deps": r.deps, "status": r.status,
             "resources": r.resources, "gpus": r.gpus, "flops": r.cost.flops, "precision": r.cost.precision,
             "what": r.cost.note, "gpu_hours": r.gpu_hours, "wall_hours": r.wall_hours, "limit_min": r.limit_min,
             "problems": r.problems} for r in plan["rows"]]
    todo = [r for r in rows if r["status"] != "done" and math.isfinite(r["gpu_hours"])]
    write_json(sweep_dir / "plan.json", {"gpu": plan["gpu"], "mfu": plan["mfu"], "mfu_source": plan["mfu_source"],
                                         "peaks_tflops": plan["peaks_tflops"], "stages": rows,
                                         "missing": plan.get("missing", []),
                                         "total_gpu_hours": sum(r["gpu_hours"] for r in todo)})
    write_text(sweep_dir / "plan.md", md)
    return md
