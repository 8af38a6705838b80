"""Stage 4: reconstruction quality on the held-out split: PSNR, SSIM, and rFID against the
same held-out images' reference features (never the training set)."""
from __future__ import annotations

import torch

from benchmark.dag import Node
from benchmark.metrics import build_detector, generation_metrics, psnr, ssim, to_uint8_rgb
from benchmark.stages.common import eval_images, extra_fds, image_grid, load_tokenizer
from benchmark.settings import EvalSettings
from benchmark.store import load_torch


@torch.no_grad()
def run(node: Node) -> dict:
    ev = EvalSettings.from_dict(node.cfg["eval"], "eval")
    tok, _ = load_tokenizer(node.deps["tokenizer"])
    images = eval_images(node.cfg)
    recs, ps, ss = [], [], []
    bs = ev.batch_size
    for i in range(0, len(images), bs):
        x = images.float_batch(torch.arange(i, min(len(images), i + bs)))
        r = tok(x).clamp(0, 1)
        ps.append(psnr(r, x)); ss.append(ssim(r, x)); recs.append(r)
    rec = torch.cat(recs)
    image_grid(torch.cat([images.float_batch(torch.arange(16)), rec[:16]]), 16, node.dir / "reconstructions.png")
    det = build_detector(ev.detector, ev.precision)
    u8 = to_uint8_rgb(rec)
    feats = det.features(u8, batch_size=bs)
    ref_dir = node.deps["fid_ref"].dir
    m = generation_metrics(feats, load_torch(ref_dir / "features.pt"),
                           kid_subset_size=ev.kid_subset_size)
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()),
            "rfid": m["fid"], "n_recon": len(images), "detector": det.version,
            **extra_fds(ev, u8, ref_dir, "rfd")}
