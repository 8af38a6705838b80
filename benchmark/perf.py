"""``python -m benchmark.perf``: throughput of every stage on this machine, against its peak.

For each case we time several repetitions after a warm-up and report the median (the machine
is noisy), count FLOPs of one step with torch's FlopCounterMode, and express the achieved
GFLOP/s as a fraction of the fp32 matrix-multiply peak measured in the same run. Peak memory
is the process's peak resident set during the case (benchmark/host_memory.py: VmHWM, reset
per case through /proc/self/clear_refs). Results go to a Markdown table and a JSON file.
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
from benchmark.host_cpu import cpu_facts, describe
from benchmark.host_memory import peak_rss_mb, reset_peak_rss
from benchmark.store import write_json, write_text

log = logging.getLogger("benchmark.perf")


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


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work: CUDA kernels run asynchronously, so a timer that did not
    wait would time the launch only. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: torch.device | str = "cpu") -> float:
    """GFLOP/s of one n x n matrix multiply on ``device``, each run to completion (median of
    ``reps`` after 3 warm-ups). Shared with gpu_check, which measures a GPU's peak the same way."""
    device = torch.device(device)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def one() -> None:
        a @ b
        sync(device)
    ts = time_case(one, reps, warmup=3)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def measure_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), reps: int = 10) -> dict:
    """The matmul peak of ``dtype`` on the current thread count: the best median over sizes.

    On a CPU with AMX (amx_bf16 in /proc/cpuinfo) oneDNN's bf16 kernels run 6x the fp32 rate;
    with AVX512-BF16 alone, less (benchmark.host_cpu names the host's; the report records it).
    Measured on an idle AMX host (medians of 15 after 2 warm-ups): 2 threads fp32 318-332 and
    bf16 1,707-2,176 GFLOP/s over 1024/2048/4096 (2,281 with out=); 1 thread fp32 161-170, bf16
    901-1,216. The first call of each size is 2-6x slower (JIT, packing: 356-1,164), and with
    another process on the cores the 2-thread bf16 medians fell to 720-870. The committed tables
    of the previous version (fp32 188, bf16 416 from one 2048^2 size, 2 warm-ups, median of 5)
    match a machine whose second core was busy: 188 is the one-thread fp32 figure. Hence: several
    sizes, 3 warm-ups, the best median, on an idle machine, recorded with the thread count."""
    by_size = {n: matmul_peak(dtype, n, reps) for n in sizes}
    return {"gflops": max(by_size.values()), "by_size": by_size, "threads": torch.get_num_threads()}


def tokenizer_step(tok, opt, x: torch.Tensor, y: torch.Tensor, autocast: Callable, dm=None) -> torch.Tensor:
    """One tokenizer update as the stage makes it (L1 reconstruction in the preset's precision),
    with the dm loss and its fake-network update when ``dm`` is given. Shared with gpu_check."""
    with autocast():
        z = tok.encode(x).float()
        loss = (tok.decode(z).float() - x).abs().mean()
    if dm is not None:
        m, _ = dm(z, y, 0)
        loss = loss + dm.weight * m
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if dm is not None:
        dm.update(z.detach(), y, 0)
    return loss.detach()


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
        tokenizer_step(tok, opt, x, y, autocast, dm if with_dm else None)

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

    @torch.no_grad()
    def cache_encode() -> None:  # the latent_cache stage: each image and its flip, no autograd
        tok.encode(x)
        tok.encode(x.flip(-1))

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
    # The precision each step runs its matrix work in, so that it is compared with that
    # precision's peak. "mixed": a bf16 tokenizer with the dm loss's fp32 networks (compared with
    # the bf16 peak, the upper bound of what the step could reach).
    tp = "bf16" if tc.get("precision") == "bf16" else "fp32"
    mixed = "mixed" if tp == "bf16" else "fp32"
    cases = {
        "tokenizer step (recon, warm-up/fine-tune)": (lambda: tok_step(False), bs, "img/s", tp),
        "DM stage: tokenizer step + dm + fake update": (lambda: tok_step(True), bs, "img/s", mixed),
        "DM stage: fake-network update only": (fake_step, bs, "latents/s", mixed),
        "decoder fine-tune step (encoder frozen)": (finetune_step, bs, "img/s", tp),
        "dm teacher training step": (teacher_step, tbs, "latents/s", "fp32"),
        "ssl_backbone: offline-MAE step": (mae_step, len(xm), "img/s", "fp32"),
        "frozen-backbone stage: MobileNetV2 features (bf16)": (backbone_features, n_feat, "img/s", "bf16"),
        "frozen-backbone stage: MLP + decoder step (bf16)": (stage1_step, bs, "img/s", "bf16"),
        "latent_cache: encode images + flips": (cache_encode, 2 * bs, "latents/s", "fp32"),
        "generator training step": (gen_step, gbs, "latents/s", "fp32"),
        f"sampling ({ev['sampler']['method']}, {ev['sampler']['steps']} steps)": (sample_step, ns, "samples/s", "fp32"),
    }
    for name, prec in (("inception-v3-compat", "fp32"), ("inception-v3-compat", "bf16"),
                       ("mobilenet_v2-imagenet", "fp32"), ("mobilenet_v2-imagenet", "bf16")):
        det = build_detector(name, prec)
        cases[f"detector {name} {prec}"] = ((lambda d=det: d.features(imgs, batch_size=n_img)), n_img, "img/s", prec)
    return cases


def run(overrides: list[str], reps: int, quick: bool, out_dir: Path, data_root: Path | None = None) -> dict:
    _, (cell,) = config.load(["grid=single", *overrides])
    cfg = cell.cfg
    torch.manual_seed(0)
    sizes = (512, 1024) if quick else (1024, 2048, 4096)
    p32, p16 = measure_peak(torch.float32, sizes, 3 if quick else 10), measure_peak(torch.bfloat16, sizes,
                                                                                    3 if quick else 10)
    peak32, peak16 = p32["gflops"], p16["gflops"]
    peaks = {"fp32": peak32, "bf16": peak16, "mixed": peak16}
    log.info("matmul peak (best median over %s, %d threads): fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s",
             "/".join(map(str, sizes)), torch.get_num_threads(), peak32, peak16)
    rows = []
    for name, (fn, items, unit, prec) in build_cases(cfg, quick).items():
        reset_peak_rss()
        ts = time_case(fn, reps)
        flops = count_flops(fn)
        med = statistics.median(ts)
        gflops = flops / med / 1e9
        rows.append({"case": name, "items_per_step": items, "unit": unit, "precision": prec,
                     "throughput": items / med, "median_step_s": med,
                     "min_step_s": min(ts), "max_step_s": max(ts), "reps": reps,
                     "gflop_per_step": flops / 1e9, "gflops": gflops,
                     "fraction_of_peak": gflops / peaks[prec], "peak_rss_mb": peak_rss_mb()})
        log.info("%-48s %9.1f %-9s %6.1f GFLOP/s (%4.0f%% of the %s peak)", name, items / med, unit,
                 gflops, 100 * gflops / peaks[prec], "bf16" if prec == "mixed" else prec)
    result = {"machine": {"cpu": cpu_facts(), "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "cuda": torch.cuda.is_available()},
              "preset": {"tokenizer": cfg["tokenizer"]["preset"], "generator": cfg["generator"]["preset"]},
              "overrides": overrides, "matmul_peak_gflops": {"fp32": peak32, "bf16": peak16},
              "matmul_peak_by_size": {"fp32": p32["by_size"], "bf16": p16["by_size"]}, "cases": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    # The data path (benchmark/datasets/throughput.py): JPEG decode + ADM crop per worker.
    from benchmark.datasets.throughput import data_path_report
    result["data_path"] = data_path_report(data_root, out_dir, quick)
    # Latent-cache reads (benchmark/stages/latent_cache.py): memory-mapped random generator batches.
    from benchmark.stages.latent_cache import perf_report
    result["latent_cache"] = perf_report(cfg, out_dir, quick)
    tag = f"{cfg['tokenizer']['preset']}_{cfg['generator']['preset']}"
    write_json(out_dir / f"perf_{tag}.json", result)
    md = [f"# perf: tokenizer {cfg['tokenizer']['preset']}, generator {cfg['generator']['preset']}",
          "", f"matmul peaks on {torch.get_num_threads()} threads (best median over sizes "
          f"{'/'.join(map(str, sizes))}): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s on {describe()}; "
          f"each step is compared with the peak of the precision it runs in (mixed: bf16 tokenizer with "
          f"fp32 dm networks, against the bf16 peak); medians of {reps} runs.", "",
          "| case | precision | throughput | GFLOP/s | % of its peak | peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['precision']} | {r['throughput']:.1f} {r['unit']} | {r['gflops']:.1f} | "
                  f"{100 * r['fraction_of_peak']:.0f}% | {r['peak_rss_mb']:.0f} |")
    md += ["", f"Data path ({result['data_path']['images']} images of {result['data_path']['source']}):", "",
           "| case | img/s | img/s per worker | mean file (kB) |", "|---|---|---|---|"]
    for r in result["data_path"]["decode"]:
        md.append(f"| JPEG decode + ADM crop {r['size']} px{' (draft)' if r['draft'] else ''}, "
                  f"{max(1, r['workers'])} worker(s) | {r['per_s']:.0f} | {r['per_worker_per_s']:.0f} | "
                  f"{r['mean_file_kb']:.0f} |")
    lcr = result["latent_cache"]
    md += ["", f"Latent cache ({lcr['rows']:,} latents {lcr['shape']} x 2 views in {lcr['shards']} shards, "
           f"written in {lcr['write_s']:.2f} s = {lcr['write_mb_per_s']:.0f} MB/s; reads memory-mapped, page "
           f"cache {lcr['page_cache']}):", "", "| random batch | latents/s | MB/s |", "|---|---|---|",
           f"| {lcr['batch_size']} | {lcr['latents_per_s']:.0f} | {lcr['mb_per_s']:.0f} |"]
    write_text(out_dir / f"perf_{tag}.md", "\n".join(md) + "\n")
    log.info("wrote %s", out_dir / f"perf_{tag}.md")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure stage throughput on this machine.")
    ap.add_argument("overrides", nargs="*", help="hydra overrides, e.g. tokenizer=cpu-tiny")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small inputs (for the test)")
    ap.add_argument("--out", type=Path, default=Path("runs/perf"))
    ap.add_argument("--data-root", type=Path, default=None,
                    help="images to time decoding on (e.g. an ImageNet train/ folder); default: synthetic JPEGs")
    ap.add_argument("--sweep", type=Path, default=None,
                    help="instead of timing steps: what a finished sweep cost, from its stage records, against "
                         "its grid's budget (benchmark/sweep_cost.py); a <run_root>/sweeps/<name> directory")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="with --sweep: worker counts to replay the launcher's schedule on")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.sweep is not None:
        if a.overrides:
            ap.error("--sweep reads a finished sweep: hydra overrides do not apply")
        from benchmark.sweep_cost import report
        try:
            report(a.sweep, a.out, a.workers)
        except (FileNotFoundError, ValueError) as e:
            ap.exit(2, f"benchmark.perf --sweep: {e}\n")
        return
    run(a.overrides, a.reps, a.quick, a.out, a.data_root)


if __name__ == "__main__":
    main()
