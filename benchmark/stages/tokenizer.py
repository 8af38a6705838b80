"""Stage 3: train the tokenizer with the cell's matching loss.

Three phases over one iteration counter (so one checkpoint resumes any of them):
1. warm-up: reconstruction only (the paper warm-starts the encoder before matching);
2. matching: reconstruction + lambda * matching loss; the loss's own networks (dm's fake
   network) step every iteration on detached latents, the tokenizer every ``tokenizer_every``;
3. decoder fine-tune: encoder and bottleneck frozen, decoder only (paper stage 4).
Writes the tokenizer weights and the latent normalisation every later stage must use.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmark.dag import Node, latent_shape
from benchmark.stages.common import build_score_net, build_tokenizer_for, dataset, encode_all, load_prior
from benchmark.data import subset
from benchmark.store import load_torch, save_torch, write_json
from benchmark.training import Checkpoint, check_finite, progress, resolve_device, warmup_lambda
from priors import LOSSES, ExactTeacher

log = logging.getLogger(__name__)


def build_matching_loss(node: Node, prior) -> Any:
    cfg = node.cfg
    lc = dict(cfg["loss"])
    name = lc.pop("name")
    cls = LOSSES.get(name)
    kwargs: dict[str, Any] = {"latent_shape": latent_shape(cfg), "num_classes": int(cfg["dataset"]["num_classes"]),
                              "prior": prior}
    if name == "dm":
        if "teacher" in node.deps:
            net = build_score_net(cfg)
            net.load_state_dict(load_torch(node.deps["teacher"].dir / "teacher.pt"))
            kwargs.update(teacher=net, teacher_kind="trained")
        else:
            kwargs.update(teacher=ExactTeacher(prior), teacher_kind="exact")
        lc.pop("teacher", None)
    return cls(**lc, **kwargs)


def _recon_loss(x_rec: torch.Tensor, x: torch.Tensor, tc: dict) -> torch.Tensor:
    loss = float(tc["l1_weight"]) * (x_rec - x).abs().mean()
    if float(tc.get("l2_weight", 0.0)):
        loss = loss + float(tc["l2_weight"]) * F.mse_loss(x_rec, x)
    return loss


def run(node: Node) -> dict:
    cfg, tc = node.cfg, node.cfg["tokenizer"]
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    train = dataset(cfg, "train")
    prior = load_prior(node)
    device = resolve_device(cfg["device"])
    tok = build_tokenizer_for(cfg).train().to(device)
    match = build_matching_loss(node, prior).to(device)  # moves dm's fake/teacher, discriminators
    prior_norm = getattr(prior, "latent_norm", None)  # feature priors normalise their features
    opt = torch.optim.AdamW(tok.parameters(), lr=float(tc["lr"]), betas=tuple(tc["betas"]),
                            weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(int(tc["lr_warmup_steps"])))
    w_it, m_it, f_it = int(tc["warmup_iters"]), int(tc["match_iters"]), int(tc["finetune_iters"])
    total, bs = w_it + m_it + f_it, int(tc["batch_size"])
    data_rng = torch.Generator().manual_seed(seed + 7)
    ckpt = Checkpoint(node.dir / "ckpt.pt", int(tc["checkpoint_every"]))
    start = 0
    if (state := ckpt.load()) is not None:
        tok.load_state_dict(state["tok"]); opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"]); match.load_state_dict(state["match"])
        match.load_extra_state(state["match_extra"]); data_rng.set_state(state["data_rng"])
        start = state["step"]

    def norm(z: torch.Tensor) -> torch.Tensor:
        return prior_norm.normalize(z) if prior_norm is not None else z

    logs: dict[str, float] = {}
    t0 = time.perf_counter()
    tok_updates = 0
    bar = progress(total, "tokenizer", start)
    for it in range(start, total):
        idx = torch.randint(len(train), (bs,), generator=data_rng)
        x, y = train.float_batch(idx).to(device), train.labels[idx].to(device)
        phase = "warmup" if it < w_it else ("match" if it < w_it + m_it else "finetune")
        if phase == "finetune":
            with torch.no_grad():  # encoder + bottleneck frozen: they get no gradient
                z = tok.encode(x)
            loss = _recon_loss(tok.decode(z), x, tc)
            check_finite(loss, "tokenizer/finetune", it)
            opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(tok.decoder.parameters(), float(tc["grad_clip"]))
            opt.step(); sched.step(); tok_updates += 1
            logs["rec"] = float(loss.detach())
        else:
            step_tok = phase == "warmup" or (it - w_it) % match.tokenizer_every == 0
            if step_tok:
                mean, logvar = tok.posterior(x)
                z = mean if logvar is None else mean + (0.5 * logvar).exp() * torch.randn_like(mean)
                rec = _recon_loss(tok.decode(z), x, tc)
                loss = rec
                if phase == "match" and match.weight > 0:
                    post = (mean, logvar) if logvar is not None else None
                    m_loss, mlogs = match(norm(z), y, it, posterior=post)
                    loss = rec + match.weight * m_loss
                    logs.update(mlogs)
                check_finite(loss, f"tokenizer/{phase}", it)
                opt.zero_grad(set_to_none=True); loss.backward()
                torch.nn.utils.clip_grad_norm_(tok.parameters(), float(tc["grad_clip"]))
                opt.step(); sched.step(); tok_updates += 1
                logs["rec"] = float(rec.detach())
                z_det = z.detach()
            else:
                with torch.no_grad():
                    z_det = tok.encode(x)
            # The loss's own networks (dm's fake) track q(z) from the first iteration on.
            logs.update(match.update(norm(z_det), y, it))
        bar.update(1)
        if bar.disable is False:
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        if ckpt.due(it + 1) and it + 1 < total:
            ckpt.save(it + 1, tok=tok.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                      match=match.state_dict(), match_extra=match.extra_state(),
                      data_rng=data_rng.get_state())
    bar.close()
    elapsed = time.perf_counter() - t0
    tok.eval()
    from tokenizers import LatentNorm
    z_all = encode_all(tok, subset(train, int(tc["norm_images"]), seed=seed), device=device)
    lnorm = LatentNorm.fit(z_all)
    save_torch(node.dir / "tokenizer.pt", {k: v.cpu() for k, v in tok.state_dict().items()})
    lnorm.save(node.dir / "latent_norm.json")
    swd = _swd_to_prior(norm(z_all), prior)
    ckpt.remove()
    rec = {"latent_mean": lnorm.mean, "latent_scale": lnorm.scale, "latent_swd_to_prior": swd,
           "tokenizer_iters": total, "tokenizer_iters_per_s": (total - start) / max(elapsed, 1e-9),
           "final_rec_loss": logs.get("rec", float("nan")), **match.describe()}
    write_json(node.dir / "final_logs.json", logs)
    return rec


def _swd_to_prior(z: torch.Tensor, prior, n_proj: int = 256) -> float:
    """Sliced Wasserstein-2 between the encoder's latents and samples of p_ref (flattened)."""
    from priors.losses.swd import random_directions, sliced_w2_sq
    g = torch.Generator().manual_seed(0)
    ref = prior.sample(z.shape[0], generator=g).reshape(z.shape[0], -1)
    a = z.reshape(z.shape[0], -1)
    return float(sliced_w2_sq(a, ref, random_directions(a.shape[1], n_proj, g)).sqrt())
