"""Stage 3: train the tokenizer with the cell's matching loss.

Three phases over one iteration counter (so one checkpoint resumes any of them):
1. warm-up: reconstruction only (the paper warm-starts the encoder before matching); with
   ``warmup_frozen_encoder`` the encoder is frozen and only bottleneck + decoder learn (DMVAE
   stage 1, for feature priors);
2. matching: reconstruction + lambda * matching loss; the loss's own networks (dm's fake
   network) step every iteration on detached latents, the tokenizer every ``tokenizer_every``;
3. decoder fine-tune: encoder and bottleneck frozen, decoder only (paper stage 4).
Reconstruction = L1/L2 + ``perceptual_weight`` x perceptual (tokenizers.losses) + an optional
PatchGAN (``gan.weight`` x adaptive weight x hinge loss, from ``gan.start_step``).
Writes the tokenizer weights and the latent normalisation every later stage must use.

Data parallel (torchrun / srun tasks), as the generator stage: ``batch_size`` is the global
batch; every rank draws the same global indices (one data generator) and computes the
reconstruction terms on its slice; gradients of the tokenizer and of the discriminator are
averaged over ranks. The matching loss is computed on the *gathered* global batch of latents,
replicated on every rank with the same random draws: batch-level losses (mmd, swd) then see the
batch one process sees, and the loss's own networks (dm's fake) take the identical step on every
rank, so they stay in sync without any gradient traffic (their step is replicated, not split).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from benchmark import distributed
from benchmark.dag import Node, latent_shape
from benchmark.stages.common import build_score_net, build_tokenizer_for, dataset, encode_all, load_prior
from benchmark.data import subset
from benchmark.store import load_torch, save_torch, stable_hash, write_json
from benchmark.training import Checkpoint, check_finite, progress, warmup_lambda
from priors import LOSSES, ExactTeacher
from tokenizers.losses import PatchGAN, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, pixel_loss

log = logging.getLogger(__name__)

SUPPORTS_DISTRIBUTED = True  # benchmark.run_stage refuses world_size > 1 for other stages
PRECISIONS = ("fp32", "bf16")


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


def average_grads(params) -> None:
    """Mean of the gradients over ranks, in one flat all-reduce (no-op in one process). Done by
    hand rather than with DistributedDataParallel because the phases freeze different parts
    (DDP would need find_unused_parameters) and the adaptive GAN weight differentiates the
    reconstruction loss alone."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        g.copy_(flat[i: i + g.numel()].view_as(g)); i += g.numel()


def gather_rows(local: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """The global batch from every rank's slice; this rank's rows keep their autograd graph."""
    if local is None or not dist.is_initialized():
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.detach().contiguous())
    parts[rank] = local
    return torch.cat(parts)


def _aug_generator(seed: int, step: int, what: str, device: torch.device) -> torch.Generator:
    # DiffAugment draws from a generator seeded by (seed, step, use): resume needs no RNG state,
    # and every rank draws the global batch's parameters (it then keeps its own rows).
    base = int(stable_hash(["tokenizer-diffaug", seed, what], 8), 16)
    return torch.Generator(device=device).manual_seed((base + step) % 2**32)


def run(node: Node) -> dict:
    cfg, tc = node.cfg, node.cfg["tokenizer"]
    seed = int(cfg["seed"])
    info = distributed.current(cfg.get("device", "auto"))
    device, world, rank = info.device, info.world_size, info.rank
    bs = int(tc["batch_size"])
    if bs % world:
        raise ValueError(f"tokenizer.batch_size={bs} is the global batch and must divide evenly over "
                         f"{world} processes; use a multiple of {world}")
    n_loc = bs // world
    rows = slice(rank * n_loc, (rank + 1) * n_loc)
    precision = str(tc.get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ValueError(f"tokenizer.precision={precision!r}; known: {', '.join(PRECISIONS)}")
    torch.manual_seed(seed)
    train = dataset(cfg, "train")
    prior = load_prior(node)
    tok = build_tokenizer_for(cfg).train().to(device)
    match = build_matching_loss(node, prior).to(device)  # moves dm's fake/teacher, discriminators
    prior_norm = getattr(prior, "latent_norm", None)  # feature priors normalise their features
    p_weight = float(tc.get("perceptual_weight", 0.0))
    perceptual = build_perceptual(str(tc["perceptual"])).to(device) if p_weight > 0 else None
    gcfg = dict(tc.get("gan") or {})
    gan = PatchGAN(int(cfg["dataset"]["channels"]), **gcfg).to(device) if float(gcfg.get("weight", 0)) > 0 else None
    opt = torch.optim.AdamW(tok.parameters(), lr=float(tc["lr"]), betas=tuple(tc["betas"]),
                            weight_decay=float(tc["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(int(tc["lr_warmup_steps"])))
    w_it, m_it, f_it = int(tc["warmup_iters"]), int(tc["match_iters"]), int(tc["finetune_iters"])
    total = w_it + m_it + f_it
    frozen_warmup = bool(tc.get("warmup_frozen_encoder", False))
    data_rng = torch.Generator().manual_seed(seed + 7)
    ckpt = Checkpoint(node.dir / "ckpt.pt", int(tc["checkpoint_every"]))
    start = 0
    if (state := ckpt.load()) is not None:  # every rank loads the same file
        tok.load_state_dict(state["tok"]); opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"]); match.load_state_dict(state["match"])
        match.load_extra_state(state["match_extra"]); data_rng.set_state(state["data_rng"])
        if gan is not None:
            gan.load_state_dict(state["gan"]); gan.opt.load_state_dict(state["gan_opt"])
        start = state["step"]
    distributed.barrier()  # all ranks have read ckpt.pt before rank 0 may replace it
    # Compiled in place (nn.Module.compile): state_dict keys stay those of the plain modules.
    if bool(tc.get("compile", False)):
        tok.encoder.compile(); tok.decoder.compile()
    # bf16 autocast (the paper's setting) on CUDA, and on CPUs with bf16 units; fp32 weights and
    # optimiser state either way.
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    shape = tuple(tok.latent_shape)

    def norm(z: torch.Tensor) -> torch.Tensor:
        return prior_norm.normalize(z) if prior_norm is not None else z

    def reconstruction(x_rec: torch.Tensor, x: torch.Tensor, it: int
                       ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, reconstruction part without the GAN term, logs)"""
        x_rec = x_rec.float()
        rec = pixel_loss(x_rec, x, float(tc["l1_weight"]), float(tc.get("l2_weight", 0.0)))
        out = {}
        if perceptual is not None:
            p = perceptual(x_rec, x)
            rec = rec + p_weight * p
            out["perceptual"] = float(p.detach())
        if gan is None or not gan.active(it):
            return rec, rec, out
        g_loss = hinge_g_loss(gan.logits(gan.augment(x_rec, _aug_generator(seed, it, "g", device), bs, rows.start)))
        w = adaptive_weight(rec, g_loss, tok.decoder.last_layer, gan.max_weight, reduce=distributed.all_reduce_mean)
        out.update(gan_g=float(g_loss.detach()), gan_adaptive_w=float(w))
        return rec + gan.weight * w * g_loss, rec, out

    def disc_step(x: torch.Tensor, x_rec: torch.Tensor, it: int) -> dict:
        with autocast():
            real = gan.logits(gan.augment(x, _aug_generator(seed, it, "real", device), bs, rows.start))
            fake = gan.logits(gan.augment(x_rec.detach().float(), _aug_generator(seed, it, "fake", device),
                                          bs, rows.start))
            d_loss = hinge_d_loss(real.float(), fake.float())
        gan.opt.zero_grad(set_to_none=True); d_loss.backward()
        average_grads(gan.disc.parameters())
        gan.opt.step()
        return {"gan_d": float(d_loss.detach())}

    logs: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = progress(total, "tokenizer", start) if info.is_main else tqdm(disable=True)
    for it in range(start, total):
        idx = torch.randint(len(train), (bs,), generator=data_rng)  # the global batch, on every rank
        x, y_all = train.float_batch(idx[rows]).to(device), train.labels[idx].to(device)
        phase = "warmup" if it < w_it else ("match" if it < w_it + m_it else "finetune")
        if phase != "finetune":
            step_tok = phase == "warmup" or (it - w_it) % match.tokenizer_every == 0
            # Drawn for the whole global batch from the shared RNG, so that every rank's stream
            # stays identical (one process draws exactly randn_like of its latents).
            eps = torch.randn((bs, *shape), device=device)[rows] if tok.stochastic and step_tok else None
        x_rec = None
        if phase == "finetune":
            with torch.no_grad(), autocast():  # encoder + bottleneck frozen: they get no gradient
                z = tok.encode(x).float()
            with autocast():
                x_rec = tok.decode(z)
                loss, rec, rlogs = reconstruction(x_rec, x, it)
            check_finite(distributed.all_reduce_mean(loss.detach()), "tokenizer/finetune", it)
            opt.zero_grad(set_to_none=True); loss.backward()
            average_grads(tok.decoder.parameters())
            torch.nn.utils.clip_grad_norm_(tok.decoder.parameters(), float(tc["grad_clip"]))
            opt.step(); sched.step()
            logs.update(rlogs, rec=float(distributed.all_reduce_mean(rec.detach())))
        elif step_tok:
            with autocast():
                mean, logvar = tok.posterior(x, freeze_encoder=frozen_warmup and phase == "warmup")
                mean = mean.float(); logvar = None if logvar is None else logvar.float()
                z = mean if logvar is None else mean + (0.5 * logvar).exp() * eps
                x_rec = tok.decode(z)
                loss, rec, rlogs = reconstruction(x_rec, x, it)
                if phase == "match" and match.weight > 0:
                    zg, mg, lg = gather_rows(z, rank), gather_rows(mean, rank), gather_rows(logvar, rank)
                    post = (mg, lg) if lg is not None else None
                    m_loss, mlogs = match(norm(zg.float()), y_all, it, posterior=post)
                    # x world: the gradient averaging below divides it back (each rank's rows get
                    # their share of d loss / d z once, from their own rank).
                    loss = loss + world * match.weight * m_loss
                    logs.update(mlogs)
            check_finite(distributed.all_reduce_mean(loss.detach()), f"tokenizer/{phase}", it)
            opt.zero_grad(set_to_none=True); loss.backward()
            average_grads(tok.parameters())
            torch.nn.utils.clip_grad_norm_(tok.parameters(), float(tc["grad_clip"]))
            opt.step(); sched.step()
            logs.update(rlogs, rec=float(distributed.all_reduce_mean(rec.detach())))
            z_det = z.detach()
        else:
            with torch.no_grad(), autocast():
                z_det = tok.encode(x).float()
        if phase != "finetune":
            # The loss's own networks (dm's fake) track q(z) from the first iteration on.
            with autocast():
                logs.update(match.update(norm(gather_rows(z_det, rank)), y_all, it))
        if gan is not None and x_rec is not None and gan.active(it):
            logs.update(disc_step(x, x_rec, it))
        bar.update(1)
        if bar.disable is False:
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
        if info.is_main and ckpt.due(it + 1) and it + 1 < total:
            extra = {"gan": gan.state_dict(), "gan_opt": gan.opt.state_dict()} if gan is not None else {}
            ckpt.save(it + 1, tok=_plain_state(tok), opt=opt.state_dict(), sched=sched.state_dict(),
                      match=match.state_dict(), match_extra=match.extra_state(),
                      data_rng=data_rng.get_state(), **extra)
    bar.close()
    elapsed = time.perf_counter() - t0
    if not info.is_main:
        return {}
    tok.eval()
    from tokenizers import LatentNorm
    z_all = encode_all(tok, subset(train, int(tc["norm_images"]), seed=seed), device=device)
    lnorm = LatentNorm.fit(z_all)
    save_torch(node.dir / "tokenizer.pt", {k: v.cpu() for k, v in _plain_state(tok).items()})
    lnorm.save(node.dir / "latent_norm.json")
    swd = _swd_to_prior(norm(z_all), prior)
    ckpt.remove()
    rec = {"latent_mean": lnorm.mean, "latent_scale": lnorm.scale, "latent_swd_to_prior": swd,
           "tokenizer_iters": total, "tokenizer_iters_per_s": (total - start) / max(elapsed, 1e-9),
           "tokenizer_images_per_s": (total - start) * bs / max(elapsed, 1e-9),
           "tokenizer_world_size": world, "tokenizer_precision": precision,
           "tokenizer_compile": bool(tc.get("compile", False)),
           "perceptual": perceptual.name if perceptual is not None else "none",
           "perceptual_weight": p_weight,
           "final_rec_loss": logs.get("rec", float("nan")), **match.describe(),
           **(gan.describe() if gan is not None else {"gan": "none"})}
    write_json(node.dir / "final_logs.json", logs)
    return rec


def _plain_state(tok: torch.nn.Module) -> dict[str, torch.Tensor]:
    # nn.Module.compile keeps keys; this also strips torch.compile's "_orig_mod." if a wrapped
    # module ever lands here, so checkpoints load into uncompiled tokenizers.
    return {k.replace("_orig_mod.", ""): v for k, v in tok.state_dict().items()}


def _swd_to_prior(z: torch.Tensor, prior, n_proj: int = 256) -> float:
    """Sliced Wasserstein-2 between the encoder's latents and samples of p_ref (flattened)."""
    from priors.losses.swd import random_directions, sliced_w2_sq
    g = torch.Generator().manual_seed(0)
    ref = prior.sample(z.shape[0], generator=g).reshape(z.shape[0], -1)
    a = z.reshape(z.shape[0], -1)
    return float(sliced_w2_sq(a, ref, random_directions(a.shape[1], n_proj, g)).sqrt())
