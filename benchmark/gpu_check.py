"""``python -m benchmark.gpu_check`` (scripts/gpu_check.sh): a few steps of every paper-scale
stage at its real shapes on one GPU, in at most about 8 minutes.

For each stage it checks that the loss (or output) is finite, and reports throughput, peak
device memory and model-FLOPs utilisation (MFU): FLOPs of one step counted with torch's
FlopCounterMode, divided by the median step time and by the GPU's dense bf16 peak
(benchmark/plan.py GPU_PEAKS; the stages run bf16 autocast). Weights are random where hub
weights are absent (DINOv2-L, LPIPS): shapes and costs do not depend on them. Per-GPU batches
are the paper's global batches over 8 GPUs.

Writes ``<out>/gpu-<gpu>.md`` and ``.json``. The JSON's ``mfu`` (the median over the training
steps) replaces the cost model's assumed utilisation in ``--plan`` for that GPU. ``--tiny`` runs
the same code at the CPU presets' sizes, which is how CI exercises it on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmark import config
from benchmark.dag import latent_shape
from benchmark.logs import setup_logging
from benchmark.host_cpu import describe
from benchmark.host_memory import peak_rss_mb
from benchmark.perf import count_flops, matmul_peak, measure_peak, sync, tokenizer_step
from benchmark.plan import GPU_PEAKS
from benchmark.store import write_json, write_text

log = logging.getLogger("benchmark.gpu_check")

PAPER = ["grid=single", "dataset=imagenet", "tokenizer=paper-in256", "generator=paper-in256", "eval=paper",
         "prior=gaussian", "loss=dm", "loss.score_net=XL", "loss.score_net_args.patch_size=1",
         "tokenizer.encoder.backbone.pretrained=false", "tokenizer.perceptual_weight=0"]
TINY = ["grid=single", "prior=gaussian", "loss=dm"]
GPUS_IN_PAPER_JOB = 8


def gpu_name(device: torch.device) -> str:
    """h100 | h200 | a100 from the CUDA device name; cpu; else the name in lower case."""
    if device.type != "cuda":
        return "cpu"
    full = torch.cuda.get_device_name(device).lower()
    for short in GPU_PEAKS:
        if short in full:
            return short
    return "".join(ch if ch.isalnum() else "-" for ch in full).strip("-")


def bf16_peak(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, source) of the dense bf16 peak the MFU is measured against."""
    name = gpu_name(device)
    if name in GPU_PEAKS:
        return GPU_PEAKS[name]["bf16"] * 1e12, f"{name} data sheet (PAPER_SCALE.md)"
    if device.type == "cuda":
        # A GPU missing from the data sheets: a large bf16 multiply (8192^2 saturates the tensor cores).
        return matmul_peak(torch.bfloat16, 8192, 10, device) * 1e9, "measured: 8192^2 bf16 matmul"
    return measure_peak(torch.bfloat16, (1024, 2048), 3)["gflops"] * 1e9, "measured: bf16 matmul on this CPU (AMX)"


def build_cases(cfg: dict, device: torch.device, tiny: bool) -> dict[str, tuple[Callable[[], torch.Tensor], int, str]]:
    """name -> (one step returning a tensor to check, items per step, unit)."""
    from benchmark.metrics import build_detector
    from benchmark.settings import TokenizerSettings
    from benchmark.stages.common import build_prior, build_score_net, build_tokenizer_for
    from benchmark.stages.generator import build_model
    from generators import flow_matching_loss, sample
    from priors import LOSSES

    tc, gc, d = cfg["tokenizer"], cfg["generator"], cfg["dataset"]
    res, ch, ncls = int(d["resolution"]), int(d["channels"]), int(d["num_classes"])
    shape = latent_shape(cfg)
    per_gpu = (lambda n: int(n)) if tiny else (lambda n: max(1, int(n) // GPUS_IN_PAPER_JOB))
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    cases: dict[str, tuple[Callable[[], torch.Tensor], int, str]] = {}

    tok = build_tokenizer_for(cfg).to(device).train()
    topt = torch.optim.AdamW(tok.parameters(), lr=1e-5)
    bs = per_gpu(tc["batch_size"])
    x = torch.rand(bs, ch, res, res, device=device)
    y = torch.randint(ncls, (bs,), device=device)
    prior = build_prior(cfg)
    dm = LOSSES.get("dm").from_config(cfg["loss"], inputs={}, latent_shape=shape, num_classes=ncls, prior=prior,
                                      tokenizer_optim=TokenizerSettings.from_dict(tc, "tokenizer").matching_optim())
    dm = dm.to(device) if hasattr(dm, "to") else dm

    def tok_step(with_dm: bool) -> torch.Tensor:
        return tokenizer_step(tok, topt, x, y, lambda: torch.autocast(device.type, dtype=torch.bfloat16),
                              dm if with_dm else None)

    cases["tokenizer step (encoder + decoder, L1)"] = (lambda: tok_step(False), bs, "img/s")
    cases["tokenizer DM step (+ dm loss + fake update)"] = (lambda: tok_step(True), bs, "img/s")

    @torch.no_grad()
    def cache_step() -> torch.Tensor:
        with amp:
            return torch.cat([tok.encode(x), tok.encode(x.flip(-1))]).float()
    cases["latent_cache: encode images + flips"] = (cache_step, 2 * bs, "latents/s")

    def dit_case(net: torch.nn.Module, batch: int) -> Callable[[], torch.Tensor]:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        z = torch.randn(batch, *shape, device=device)
        yy = torch.randint(ncls, (batch,), device=device)

        def step() -> torch.Tensor:
            with amp:
                loss = flow_matching_loss(net, z, yy)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            return loss.detach()
        return step

    tb = per_gpu(cfg["loss"].get("teacher_batch_size", 128))
    cases["teacher step (flow matching)"] = (dit_case(build_score_net(cfg).to(device).train(), tb), tb, "latents/s")
    gb = per_gpu(gc["batch_size"])
    gen = build_model(cfg).to(device).train()
    cases["generator step (flow matching)"] = (dit_case(gen, gb), gb, "latents/s")

    ev = cfg["eval"]
    sb = min(int(ev.get("shard_size") or ev["batch_size"]), 256)
    noise = torch.randn(sb, *shape, device=device)
    ys = torch.randint(ncls, (sb,), device=device)
    gen_eval = build_model(cfg).to(device).eval()

    @torch.no_grad()
    def sample_step() -> torch.Tensor:  # one sampler step; a sample takes sampler.steps of them
        with amp:
            return sample(gen_eval, noise, ys, steps=1, method="euler").float()
    cases[f"gen_eval: one sampler step (x {ev['sampler']['steps']} per sample)"] = (sample_step, sb, "samples/s")

    db = min(int(ev["batch_size"]), 8 if tiny else 64)
    zd = torch.randn(db, *shape, device=device)
    det = build_detector(ev["detector"], "bf16")
    if hasattr(det, "to"):
        det = det.to(device)

    @torch.no_grad()
    def decode_detect() -> torch.Tensor:
        with amp:
            imgs = tok.decode(zd).float().clamp(0, 1)
        u8 = (imgs * 255).round().to(torch.uint8)
        return det.features(u8, batch_size=db)["pool"]
    cases["gen_eval: decode + Inception features"] = (decode_detect, db, "img/s")
    return cases


TRAINING = ("tokenizer step", "tokenizer DM step", "teacher step", "generator step")


def run(tiny: bool, steps: int, out_dir: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _, (cell,) = config.load(TINY if tiny else PAPER, missing=[])
    cfg = cell.cfg
    torch.manual_seed(0)
    peak, peak_src = bf16_peak(device)
    name = gpu_name(device)
    log.info("gpu_check on %s (%s): bf16 peak %.3g TFLOP/s (%s)", device, name, peak / 1e12, peak_src)
    rows = []
    t_all = time.perf_counter()
    for case, (fn, items, unit) in build_cases(cfg, device, tiny).items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row: dict = {"case": case, "items_per_step": items, "unit": unit}
        try:
            out = fn()  # warm-up (allocations, cuDNN autotuning)
            sync(device)
            ts = []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                ts.append(time.perf_counter() - t0)
            finite = bool(torch.isfinite(out).all())
            flops = count_flops(fn)
            med = statistics.median(ts)
            row.update(finite=finite, median_step_s=med, throughput=items / med, gflop_per_step=flops / 1e9,
                       mfu=flops / med / peak,
                       # device memory on a GPU; the process's peak resident set on the CPU
                       peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                                    else peak_rss_mb() / 1024))
            log.info("%-55s %9.1f %-10s MFU %5.1f%%  peak %.1f GB  finite=%s", case, row["throughput"], unit,
                     100 * row["mfu"], row["peak_mem_gb"], finite)
        except torch.OutOfMemoryError as exc:  # a finding, not a crash: the next stage still runs
            row.update(finite=False, error=f"out of memory: {exc}".splitlines()[0])
            log.error("%s: %s", case, row["error"])
            torch.cuda.empty_cache()
        rows.append(row)
    train_mfu = [r["mfu"] for r in rows if r.get("mfu") is not None and r["case"].startswith(TRAINING)]
    result = {"gpu": name, "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                      # hosts differ in speed and rounding: name the model and its bf16 path
                                      else f"CPU {describe()}, {torch.get_num_threads()} threads"),
              "torch": torch.__version__, "tiny": tiny, "bf16_peak_tflops": peak / 1e12, "peak_source": peak_src,
              "mfu": statistics.median(train_mfu) if train_mfu else None, "all_finite": all(r.get("finite") for r in rows),
              "steps": steps, "seconds": time.perf_counter() - t_all, "cases": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"gpu-{name}.json", result)
    md = [f"# GPU check: {result['device']} ({'CPU-size presets' if tiny else 'paper-scale shapes'})", "",
          f"bf16 dense peak {peak / 1e12:.3g} TFLOP/s ({peak_src}); medians of {steps} steps after a warm-up; "
          f"torch {torch.__version__}; {result['seconds']:.0f} s in all. Per-GPU batches are the paper's global "
          f"batches / {GPUS_IN_PAPER_JOB}. MFU of the training steps (median): "
          + (f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a") + ".", "",
          "| stage step | throughput | GFLOP/step | MFU (bf16 peak) | peak memory (GB) | finite |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['case']} | {r['error']} | | | | no |")
        else:
            md.append(f"| {r['case']} | {r['throughput']:.1f} {r['unit']} | {r['gflop_per_step']:.0f} | "
                      f"{100 * r['mfu']:.1f}% | {r['peak_mem_gb']:.1f} | {'yes' if r['finite'] else 'NO'} |")
    write_text(out_dir / f"gpu-{name}.md", "\n".join(md) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m benchmark.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the CPU presets' sizes (CI, no GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (after one warm-up)")
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.tiny and not torch.cuda.is_available():
        log.error("no CUDA device: the paper-scale check needs a GPU; --tiny runs the CPU presets")
        return 2
    result = run(args.tiny, args.steps, args.out)
    return 0 if result["all_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
