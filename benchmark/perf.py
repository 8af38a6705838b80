"""``python -m benchmark.perf``: throughput of every stage on this machine, against its peak.

For each case we time several repetitions after a warm-up and report the median (the machine
is noisy), count FLOPs of one step with torch's FlopCounterMode, and express the achieved
GFLOP/s as a fraction of the fp32 matrix-multiply peak measured in the same run. Peak memory
is the process's peak resident set during the case (VmHWM, reset per case through
/proc/self/clear_refs). Results go to a Markdown table and a JSON file.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark import config
from benchmark.dag import latent_shape
from benchmark.store import write_json, write_text

log = logging.getLogger("benchmark.perf")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def time_case(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    ts = time_case(lambda: a @ b, reps, warmup=2)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def build_cases(cfg: dict, quick: bool) -> dict[str, tuple[Callable[[], object], int, str]]:
    """name -> (one step, items per step, unit)."""
    from benchmark.metrics import build_detector
    from benchmark.stages.common import build_prior, build_tokenizer_for
    from benchmark.stages.generator import build_model
    from generators import flow_matching_loss, sample
    from benchmark.settings import TokenizerSettings
    from priors import LOSSES

    tc, gc = cfg["tokenizer"], cfg["generator"]
    res, ch = int(cfg["dataset"]["resolution"]), int(cfg["dataset"]["channels"])
    ncls = int(cfg["dataset"]["num_classes"])
    shape = latent_shape(cfg)
    bs = int(tc["batch_size"])
    x = torch.rand(bs, ch, res, res)
    y = torch.randint(ncls, (bs,))
    tok = build_tokenizer_for(cfg).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)
    prior = build_prior(cfg)
    # The fake's optimiser follows the tokenizer's DM-phase recipe, as in the tokenizer stage.
    optim = TokenizerSettings.from_dict(tc, "tokenizer").matching_optim()
    dm = LOSSES.get("dm").from_config(cfg["loss"], inputs={}, latent_shape=shape, num_classes=ncls, prior=prior,
                                      tokenizer_optim=optim)

    import contextlib
    # The preset's precision, as the tokenizer stage runs it (bf16 autocast on this CPU).
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if tc.get("precision") == "bf16" \
        else contextlib.nullcontext

    def tok_step(with_dm: bool) -> None:
        with autocast():
            z = tok.encode(x).float()
            loss = (tok.decode(z).float() - x).abs().mean()
        if with_dm:
            m, _ = dm(z, y, 0)
            loss = loss + dm.weight * m
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if with_dm:
            dm.update(z.detach(), y, 0)

    def fake_step() -> None:
        with torch.no_grad(), autocast():
            z = tok.encode(x).float()
        dm.update(z, y, 0)

    def finetune_step() -> None:  # paper stage 4: encoder frozen, decoder only
        with torch.no_grad(), autocast():
            z = tok.encode(x).float()
        with autocast():
            loss = (tok.decode(z).float() - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from benchmark.stages.common import build_score_net
    teacher = build_score_net(cfg).train()
    topt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    tbs = int(cfg["loss"].get("teacher_batch_size", 128))
    zt, yt = torch.randn(tbs, *shape), torch.randint(ncls, (tbs,))

    def teacher_step() -> None:
        loss = flow_matching_loss(teacher, zt, yt)
        topt.zero_grad(set_to_none=True)
        loss.backward()
        topt.step()

    # Frozen-backbone stage (stage 1) on the offline MobileNetV2: feature extraction, then
    # bottleneck MLP + decoder steps on cached features, at the feature priors' defaults (bf16).
    from backbones import build_backbone
    from tokenizers import bottleneck_mlp, build_decoder
    mb = build_backbone({"name": "mobilenet_v2", "layer": 14, "input_size": 16 * shape[1]}).eval()
    n_feat = 16 if quick else 128
    xf = torch.rand(n_feat, ch, res, res)

    @torch.no_grad()
    def backbone_features() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mb(xf)

    feats = torch.randn(bs, mb.out_dim, shape[1], shape[2])
    s1_dec = build_decoder(tc["decoder"], shape[0], ch)
    s1_proj = bottleneck_mlp(mb.out_dim, 2 * mb.out_dim, shape[0])
    s1_opt = torch.optim.AdamW(list(s1_dec.parameters()) + list(s1_proj.parameters()), lr=1e-4)

    def stage1_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (s1_dec(s1_proj(feats)).float() - x).abs().mean()
        s1_opt.zero_grad(set_to_none=True)
        loss.backward()
        s1_opt.step()

    from backbones.offline_mae import MAE
    mae = MAE(img_size=res).train()
    mopt = torch.optim.AdamW(mae.parameters(), lr=1e-4)
    xm = torch.rand(128 if not quick else 16, 3, res, res)

    def mae_step() -> None:
        loss = mae.loss(xm, 0.75)
        mopt.zero_grad(set_to_none=True)
        loss.backward()
        mopt.step()

    gen = build_model(cfg).train()
    gopt = torch.optim.AdamW(gen.parameters(), lr=1e-4)
    gbs = int(gc["batch_size"])
    zl = torch.randn(gbs, *shape)
    yl = torch.randint(ncls, (gbs,))

    def gen_step() -> None:
        loss = flow_matching_loss(gen, zl, yl)
        gopt.zero_grad(set_to_none=True)
        loss.backward()
        gopt.step()

    ev = cfg["eval"]
    ns = 50 if quick else int(ev["batch_size"])
    noise, ys = torch.randn(ns, *shape), torch.randint(ncls, (ns,))
    gen_eval = build_model(cfg).eval()

    @torch.no_grad()
    def sample_step() -> None:
        sample(gen_eval, noise, ys, steps=int(ev["sampler"]["steps"]), method=ev["sampler"]["method"])

    n_img = 4 if quick else 64
    imgs = (torch.rand(n_img, 3, res, res) * 255).to(torch.uint8)
    cases = {
        "tokenizer step (recon, warm-up/fine-tune)": (lambda: tok_step(False), bs, "img/s"),
        "DM stage: tokenizer step + dm + fake update": (lambda: tok_step(True), bs, "img/s"),
        "DM stage: fake-network update only": (fake_step, bs, "latents/s"),
        "decoder fine-tune step (encoder frozen)": (finetune_step, bs, "img/s"),
        "dm teacher training step": (teacher_step, tbs, "latents/s"),
        "ssl_backbone: offline-MAE step": (mae_step, len(xm), "img/s"),
        "frozen-backbone stage: MobileNetV2 features (bf16)": (backbone_features, n_feat, "img/s"),
        "frozen-backbone stage: MLP + decoder step (bf16)": (stage1_step, bs, "img/s"),
        "generator training step": (gen_step, gbs, "latents/s"),
        f"sampling ({ev['sampler']['method']}, {ev['sampler']['steps']} steps)": (sample_step, ns, "samples/s"),
    }
    for name, prec in (("inception-v3-compat", "fp32"), ("inception-v3-compat", "bf16"),
                       ("mobilenet_v2-imagenet", "fp32"), ("mobilenet_v2-imagenet", "bf16")):
        det = build_detector(name, prec)
        cases[f"detector {name} {prec}"] = ((lambda d=det: d.features(imgs, batch_size=n_img)), n_img, "img/s")
    return cases


def run(overrides: list[str], reps: int, quick: bool, out_dir: Path) -> dict:
    _, (cell,) = config.load(["grid=single", *overrides])
    cfg = cell.cfg
    torch.manual_seed(0)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    log.info("matmul peak (2048^2, %d threads): fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s",
             torch.get_num_threads(), peak32, peak16)
    rows = []
    for name, (fn, items, unit) in build_cases(cfg, quick).items():
        _reset_peak_rss()
        ts = time_case(fn, reps)
        flops = count_flops(fn)
        med = statistics.median(ts)
        gflops = flops / med / 1e9
        rows.append({"case": name, "items_per_step": items, "unit": unit,
                     "throughput": items / med, "median_step_s": med,
                     "min_step_s": min(ts), "max_step_s": max(ts), "reps": reps,
                     "gflop_per_step": flops / 1e9, "gflops": gflops,
                     "fraction_of_fp32_peak": gflops / peak32, "peak_rss_mb": _peak_rss_mb()})
        log.info("%-48s %9.1f %-9s %6.1f GFLOP/s (%4.0f%% of fp32 peak)", name, items / med, unit,
                 gflops, 100 * gflops / peak32)
    result = {"machine": {"cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "cuda": torch.cuda.is_available()},
              "preset": {"tokenizer": cfg["tokenizer"]["preset"], "generator": cfg["generator"]["preset"]},
              "overrides": overrides, "matmul_peak_gflops": {"fp32": peak32, "bf16": peak16}, "cases": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{cfg['tokenizer']['preset']}_{cfg['generator']['preset']}"
    write_json(out_dir / f"perf_{tag}.json", result)
    md = [f"# perf: tokenizer {cfg['tokenizer']['preset']}, generator {cfg['generator']['preset']}",
          "", f"matmul peak 2048^2 on {torch.get_num_threads()} threads: fp32 {peak32:.0f} GFLOP/s, "
          f"bf16 {peak16:.0f} GFLOP/s; medians of {reps} runs.", "",
          "| case | throughput | GFLOP/s | % fp32 peak | peak RSS (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['throughput']:.1f} {r['unit']} | {r['gflops']:.1f} | "
                  f"{100 * r['fraction_of_fp32_peak']:.0f}% | {r['peak_rss_mb']:.0f} |")
    write_text(out_dir / f"perf_{tag}.md", "\n".join(md) + "\n")
    log.info("wrote %s", out_dir / f"perf_{tag}.md")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure stage throughput on this machine.")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. tokenizer=cpu-tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small inputs (for the test)")
    ap.add_argument("--out", type=Path, default=Path("runs/perf"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(a.overrides, a.reps, a.quick, a.out)


if __name__ == "__main__":
    main()
