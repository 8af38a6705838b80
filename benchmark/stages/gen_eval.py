"""Stage 6: sample class-balanced latents from the EMA generator, decode them with the
tokenizer (undoing the latent normalisation recorded by the tokenizer stage), and score them
with torch-fidelity metrics against the cached held-out reference features."""
from __future__ import annotations

import torch

from benchmark.dag import Node, latent_shape
from benchmark.metrics import build_detector, generation_metrics, to_uint8_rgb
from benchmark.stages.common import extra_fds, image_grid, load_tokenizer
from benchmark.stages.generator import build_model
from benchmark.settings import DatasetSettings, EvalSettings
from benchmark.store import load_torch
from benchmark.metrics import feature_statistics, frechet_distance, load_npz_statistics
from generators import balanced_labels, random_labels, sample


@torch.no_grad()
def run(node: Node) -> dict:
    cfg = node.cfg
    ev = EvalSettings.from_dict(cfg["eval"], "eval")
    sc = ev.sampler
    tok, lnorm = load_tokenizer(node.deps["tokenizer"])
    model = build_model(cfg)
    model.load_state_dict(load_torch(node.deps["generator"].dir / "ema.pt"))
    model.eval()
    n, ncls = ev.n_samples, DatasetSettings.from_dict(cfg["dataset"], "dataset").num_classes
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 1000)
    label_mode = ev.label_mode
    if label_mode == "balanced":
        labels = balanced_labels(n, ncls)   # n / K per class, as the ADM 50 x 1000 protocol
    elif label_mode == "random":
        labels = random_labels(n, ncls, generator=g)
    else:
        raise ValueError(f"eval.labels must be 'balanced' or 'random', got {label_mode!r}")
    shape = latent_shape(cfg)
    imgs, bs = [], ev.batch_size
    for i in range(0, n, bs):
        y = labels[i:i + bs]
        noise = torch.randn(len(y), *shape, generator=g)
        z = sample(model, noise, y, steps=sc.steps, method=sc.method, cfg_scale=sc.cfg_scale,
                   cfg_interval=sc.cfg_interval, time_shift=sc.time_shift, generator=g)
        imgs.append(tok.decode(lnorm.denormalize(z)))
    x = torch.cat(imgs)
    if not torch.isfinite(x).all():
        raise FloatingPointError("stage 'gen_eval': decoded samples contain NaN/inf")
    out_of_range = float(((x < 0) | (x > 1)).float().mean())
    x = x.clamp(0, 1)
    order = torch.argsort(labels[:100], stable=True)
    image_grid(x[:100][order], 10, node.dir / "samples.png")
    det = build_detector(ev.detector, ev.precision)
    u8 = to_uint8_rgb(x)
    feats = det.features(u8, batch_size=bs)
    ref_dir = node.deps["fid_ref"].dir
    m = generation_metrics(feats, load_torch(ref_dir / "features.pt"), seed=int(cfg["seed"]),
                           kid_subset_size=ev.kid_subset_size)
    extra: dict = {}
    if ev.ref_npz:
        # Published statistics (e.g. ADM's ImageNet-256 VIRTUAL_imagenet256_labeled.npz), so that
        # paper-scale gFID is computed against the same reference as the literature.
        mu_r, sig_r = load_npz_statistics(ev.ref_npz)
        extra["gfid_ref_npz"] = frechet_distance(*feature_statistics(feats["pool"]), mu_r, sig_r)
        extra["ref_npz"] = ev.ref_npz
    return {**extra, "gfid": m["fid"], "kid": m["kid_mean"], "kid_std": m["kid_std"],
            "precision": m["precision"], "recall": m["recall"], "is": m["is_mean"],
            "n_samples": n, "label_sampling": label_mode, "sampler": sc.method,
            "sampler_steps": sc.steps, "cfg_scale": sc.cfg_scale,
            "sample_seed": int(cfg["seed"]) + 1000, "decoded_out_of_range_frac": out_of_range,
            "detector": det.version, **extra_fds(ev, u8, ref_dir, "fd")}
