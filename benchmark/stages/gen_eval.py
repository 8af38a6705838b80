"""Stage 6: sample class-balanced latents from the EMA generator, decode them with the
tokenizer (undoing the latent normalisation recorded by the tokenizer stage), and score them
with torch-fidelity metrics against the cached held-out reference features.

Sharded and resumable (benchmark/stages/sample_shards.py): the set is cut into shards of
``eval.shard_size``, each drawn from its own generator seeded by (cell seed + offset, shard
index), so the samples and every metric are the same on 1 or W ranks (torchrun / SLURM tasks:
rank r draws shards r, r + W, ...). Sampling, decoding and every detector run on the rank's
device; each shard file (its uint8 images, labels and all detector features) is written
atomically into ``shards/``, and a rerun after a kill -9 skips the shards already there. After a
barrier, rank 0 reads the features back from the shard files (not all_gather: the files are what
a requeue resumes from anyway, they work when the world size changes between the killed run and
its rerun, and rank 0 then holds features only, 8 KB per sample for Inception) and computes the
metrics. With ``eval.save_npz`` it also streams the images into ``samples.npz`` (guided-diffusion's
evaluator format: arr_0 uint8 NHWC RGB, arr_1 labels).

With the domain detector on (eval.domain), max(eval.n_samples, domain.n_samples) samples are
drawn: the first eval.n_samples are exactly those of a run without it (a shard is always drawn
whole), the rest continue the round-robin labels, so the whole set stays class-balanced. Inception and the extra
detectors score the first eval.n_samples; the domain detector scores all of them (``fd_domain``,
``kid_domain``, ``precision_domain``, ``recall_domain``). The EMA snapshots the generator kept
(its record's ``ema_snapshots``), and the final EMA as ``snap100``, are each scored with the domain
detector on domain.snapshot_n_samples samples with the same labels and noise (``snapNNN_fd_domain``,
``snapNNN_step``), sharded the same way. With eval.bootstrap > 0 every FD gets a 95% bootstrap
interval over resamples of the generated set (``gfid_lo``, ``fd_domain_hi``, ...).
"""
from __future__ import annotations

import logging

import torch

from benchmark import distributed
from benchmark.accel import compile_in_place
from benchmark.dag import Node, latent_shape
from benchmark.host_memory import peak_rss_mb
from benchmark.metrics import Detector, build_detector, feature_statistics, frechet_distance, load_npz_statistics
from benchmark.metrics.columns import fd, fd_interval_columns, named_fds, space_columns
from benchmark.metrics.generation import generation_metrics
from benchmark.settings import DatasetSettings, EvalSettings
from benchmark.stages import domain_detector
from benchmark.stages import sample_shards as shards
from benchmark.stages.common import features_file, image_grid, load_tokenizer
from benchmark.stages.fid_ref import DOMAIN_FEATURES
from benchmark.stages.generator import build_model
from benchmark.store import load_torch, read_json

log = logging.getLogger(__name__)

SAMPLE_OFFSET, BOOTSTRAP_OFFSET, SNAPSHOT_OFFSET = 1000, 3000, 2000  # seeds = cell seed + offset
DOMAIN = "domain"  # the domain detector's key in shard files; the others are their registry names


def snapshot_entries(gen_node: Node) -> list[dict]:
    """The generator's EMA snapshots in training order, then the final EMA (ema.pt) as fraction
    1; empty when the generator kept none."""
    snaps = list(read_json(gen_node.record_path)["facts"].get("ema_snapshots") or [])
    if not snaps:
        return []
    snaps.sort(key=lambda e: float(e["fraction"]))
    if all(round(100 * float(e["fraction"])) != 100 for e in snaps):
        snaps.append({"fraction": 1.0, "step": int(gen_node.cfg["generator"]["steps"]), "file": "ema.pt"})
    return snaps


def _pct(entry: dict) -> str:
    return f"snap{round(100 * float(entry['fraction'])):03d}"


def _detectors(node: Node, ev: EvalSettings, device: torch.device) -> dict[str, Detector]:
    dets = {name: build_detector(name, ev.precision).to(device) for name in (ev.detector, *ev.extra_detectors)}
    if ev.domain.enabled:
        dets[DOMAIN] = domain_detector.detector(node.deps["domain_detector"], ev.precision).to(device)
    return dets


def _draw_plan(plan: shards.ShardPlan, node: Node, draw: shards.ShardSampler, labels: torch.Tensor, base: int,
               dets: dict[str, Detector], rows: dict[str, int], info: distributed.DistInfo, ev: EvalSettings,
               keep_images: bool) -> int:
    """This rank's shards of ``plan`` that are not on disk yet; returns how many it drew."""
    drawn = 0
    for i in plan.mine(info.rank, info.world_size):
        start, end = plan.bounds(i)
        lab = labels[start:end]
        if shards.finished(plan, node.dir, i, lab):
            log.info("%s shard %d/%d already on disk: skipped", plan.name, i + 1, plan.count)
            continue
        images, outside = draw(labels[start:start + plan.size], shards.shard_seed(base, i), keep=end - start)
        local_rows = {k: r - start for k, r in rows.items()}
        feats = shards.features(dets, images, local_rows, ev.batch_size)
        shards.save_shard(plan.path(node.dir, i), start, lab, feats,
                          *((images, outside) if keep_images else ()))
        drawn += 1
        log.info("%s shard %d/%d (samples %d-%d) written by rank %d", plan.name, i + 1, plan.count, start, end - 1,
                 info.rank)
    return drawn


def _sample(node: Node, ev: EvalSettings, info: distributed.DistInfo) -> tuple[shards.ShardPlan, dict, dict]:
    """Every rank: draw its shards of the main set and of each EMA snapshot's set. Returns the
    main plan, the snapshots' plans and the detectors' version strings."""
    cfg, dev = node.cfg, info.device
    tok, lnorm = load_tokenizer(node.deps["tokenizer"])
    model = build_model(cfg)
    model.load_state_dict(load_torch(node.deps["generator"].dir / "ema.pt"))
    model.to(dev).eval()
    if ev.compile:
        # In place: the snapshots below load their weights into the same compiled module.
        compile_in_place(model)
    draw = shards.ShardSampler(model, tok.to(dev), lnorm, ev.sampler, latent_shape(cfg), dev, ev.batch_size)
    ncls = DatasetSettings.from_dict(cfg["dataset"], "dataset").num_classes
    seed, n = int(cfg["seed"]), ev.n_samples
    n_main = max(n, ev.domain.n_samples) if ev.domain.enabled else n
    dets = _detectors(node, ev, dev)
    rows = {name: (n_main if name == DOMAIN else n) for name in dets}
    plan = shards.ShardPlan("main", n_main, ev.shard_size)
    labels = shards.set_labels(ev.label_mode, plan.padded, ncls, seed + SAMPLE_OFFSET)
    drawn = _draw_plan(plan, node, draw, labels, seed + SAMPLE_OFFSET, dets, rows, info, ev, keep_images=True)
    snaps: dict = {}
    if ev.domain.enabled:
        entries = snapshot_entries(node.deps["generator"])
        n_snap = ev.domain.snapshot_n_samples
        padded = shards.ShardPlan("snap", n_snap, ev.shard_size).padded
        snap_labels = shards.set_labels(ev.label_mode, padded, ncls, seed + SNAPSHOT_OFFSET + 1)
        for e in entries:
            splan = shards.ShardPlan(_pct(e), n_snap, ev.shard_size)
            if all(shards.finished(splan, node.dir, i, snap_labels[slice(*splan.bounds(i))])
                   for i in splan.mine(info.rank, info.world_size)):
                snaps[_pct(e)] = (splan, e)
                continue
            model.load_state_dict(load_torch(node.deps["generator"].dir / e["file"]))
            # The same labels and noise for every snapshot: only the weights differ.
            drawn += _draw_plan(splan, node, draw, snap_labels, seed + SNAPSHOT_OFFSET, {DOMAIN: dets[DOMAIN]},
                                {DOMAIN: n_snap}, info, ev, keep_images=False)
            snaps[_pct(e)] = (splan, e)
    log.info("rank %d drew %d shard(s)", info.rank, drawn)
    return plan, snaps, {name: det.version for name, det in dets.items()}


def _domain_columns(node: Node, ev: EvalSettings, plan: shards.ShardPlan, snaps: dict, seed: int,
                    version: str) -> dict:
    ref = load_torch(node.deps["fid_ref"].dir / DOMAIN_FEATURES)["pool"]
    gen = shards.gather(plan, node.dir, DOMAIN, plan.n)["pool"]
    stats = feature_statistics(ref)
    out = {**space_columns(gen, ref, "_domain", ev.domain.kid_subset_size, seed),
           **fd_interval_columns("fd_domain", gen, stats, ev.bootstrap, seed + BOOTSTRAP_OFFSET),
           "n_samples_domain": len(gen),
           "detector_domain": version}
    for pct, (splan, e) in snaps.items():
        out[f"{pct}_fd_domain"] = fd(shards.gather(splan, node.dir, DOMAIN, splan.n)["pool"], stats)
        out[f"{pct}_step"] = int(e["step"])
        log.info("EMA snapshot %s (step %d): fd_domain %.4g", e["file"], e["step"], out[f"{pct}_fd_domain"])
    if snaps:
        out["snapshot_n_samples"] = ev.domain.snapshot_n_samples
    return out


def _score(node: Node, ev: EvalSettings, plan: shards.ShardPlan, snaps: dict, versions: dict,
           info: distributed.DistInfo) -> dict:
    """Rank 0, after every shard is on disk: the metrics, the grid and (on request) samples.npz."""
    seed, n, sc, device = int(node.cfg["seed"]), ev.n_samples, ev.sampler, info.device
    ref_dir = node.deps["fid_ref"].dir
    first = list(shards.shard_images(plan, node.dir, 100))
    images, labels = torch.cat([x for x, _ in first]), torch.cat([y for _, y in first])
    order = torch.argsort(labels, stable=True)
    image_grid(images[order].float() / 255, 10, node.dir / "samples.png")
    feats = shards.gather(plan, node.dir, ev.detector, n)
    ref = load_torch(ref_dir / "features.pt")
    # Precision/recall: blocked distance matrices above 10,000 rows (generation.AUTO_BLOCK_ROWS),
    # computed on this rank's device (seconds on a GPU at 50,000, minutes on CPU cores).
    m = generation_metrics(feats, ref, seed=seed, kid_subset_size=ev.kid_subset_size, device=device)
    out: dict = fd_interval_columns("gfid", feats["pool"], feature_statistics(ref["pool"]), ev.bootstrap,
                                    seed + BOOTSTRAP_OFFSET)
    if ev.bootstrap > 0:
        out["bootstrap_replicates"] = ev.bootstrap
    if ev.ref_npz:
        # Published statistics (e.g. ADM's ImageNet-256 VIRTUAL_imagenet256_labeled.npz), so that
        # paper-scale gFID is computed against the same reference as the literature: the sample
        # side's statistics are ours (torch-fidelity's Inception port), the reference side ADM's.
        mu_r, sig_r = load_npz_statistics(ev.ref_npz)
        out["gfid_ref_npz"] = frechet_distance(*feature_statistics(feats["pool"]), mu_r, sig_r)
        out["ref_npz"] = ev.ref_npz
    out.update(named_fds("fd", {k: shards.gather(plan, node.dir, k, n)["pool"] for k in ev.extra_detectors},
                         {k: load_torch(ref_dir / features_file(k, primary=False))["pool"] for k in ev.extra_detectors},
                         versions))
    if ev.domain.enabled:
        out.update(_domain_columns(node, ev, plan, snaps, seed, versions[DOMAIN]))
    if ev.save_npz:
        shards.write_npz(plan, node.dir, n, node.dir / shards.NPZ_NAME)
        out["samples_npz"] = shards.NPZ_NAME
    outside = shards.shard_sums(plan, node.dir, "outside", n)
    c, h, w = images.shape[1:]
    return {**out, "gfid": m["fid"], "kid": m["kid_mean"], "kid_std": m["kid_std"],
            "precision": m["precision"], "recall": m["recall"], "is": m["is_mean"],
            "n_samples": n, "label_sampling": ev.label_mode, "sampler": sc.method,
            "sampler_steps": sc.steps, "cfg_scale": sc.cfg_scale,
            "sample_seed": seed + SAMPLE_OFFSET, "shard_size": ev.shard_size, "shards": plan.count,
            "gen_eval_world_size": info.world_size, "decoded_out_of_range_frac": outside / (n * c * h * w),
            "detector": versions[ev.detector],
            # rank 0's peak host memory in MiB (it also scores), over the whole stage.
            "peak_rss_mb_rank0": peak_rss_mb()}


@torch.no_grad()
def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    info = distributed.current(node.cfg.get("device", "auto"))
    plan, snaps, versions = _sample(node, ev, info)
    distributed.barrier()  # every shard is on disk before rank 0 reads them
    if not info.is_main:
        return {}
    return _score(node, ev, plan, snaps, versions, info)
