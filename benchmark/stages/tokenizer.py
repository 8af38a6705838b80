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
batch one process sees. The loss's own networks step on the gathered batch, replicated on every
rank, except for a loss with ``update_sharded`` (dm): its fake trains on each rank's own rows
with that rank's share of the global batch's draws, and its gradients are averaged over ranks.
"""
from __future__ import annotations

import contextlib
import logging
import time
import typing
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from benchmark import distributed
from benchmark.dag import Node, latent_shape
from benchmark.stages.common import ARCH_FILE, build_tokenizer_for, dataset, load_prior, load_tokenizer
from benchmark.data import subset
from benchmark.settings import DatasetSettings, Precision, TokenizerSettings
from benchmark.store import save_torch, stable_hash, write_json
from benchmark.accel import adamw, channels_last, compile_in_place
from benchmark.monitor import TrainMonitor
from benchmark.training import Checkpoint, check_finite, progress, warmup_lambda
from priors import LOSSES
from tokenizers import encode_all
from tokenizers.losses import PatchGAN, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, pixel_loss

log = logging.getLogger(__name__)

PRECISIONS = typing.get_args(Precision)  # ("fp32", "bf16")


def build_matching_loss(node: Node, prior) -> Any:
    """The cell's matching loss, given the outputs of the stages it declared upstream (e.g. the
    dm loss's trained teacher)."""
    from benchmark.upstream import STAGES
    cfg = node.cfg
    lc = dict(cfg["loss"])
    cls = LOSSES.get(lc.pop("name"))
    inputs = {role: STAGES.get(dep.stage).output(dep) for role, dep in node.deps.items() if role != "reference"}
    # A loss with networks of its own (dm's fake) may follow the tokenizer's optimiser recipe.
    optim = TokenizerSettings.from_dict(cfg["tokenizer"], "tokenizer").matching_optim()
    return cls.from_config(lc, inputs=inputs, latent_shape=latent_shape(cfg),
                           num_classes=DatasetSettings.from_dict(cfg["dataset"], "dataset").num_classes,
                           prior=prior, tokenizer_optim=optim)


def output(node: Node):
    """(tokenizer, latent normalisation), for a stage that declared this tokenizer upstream
    (difftraj's reference)."""
    return load_tokenizer(node)


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


class TokenizerTraining:
    """Everything one tokenizer run holds (models, optimisers, matching loss, GAN, data order,
    distributed slice), with one method per phase step. ``run`` below reads as the schedule."""

    def __init__(self, node: Node) -> None:
        cfg = node.cfg
        tc = TokenizerSettings.from_dict(cfg["tokenizer"], "tokenizer")
        self.node, self.cfg, self.tc = node, cfg, tc
        self.seed = int(cfg["seed"])
        self.info = distributed.current(cfg.get("device", "auto"))
        self.device, self.world, self.rank = self.info.device, self.info.world_size, self.info.rank
        self.bs = bs = tc.batch_size
        if bs % self.world:
            raise ValueError(f"tokenizer.batch_size={bs} is the global batch and must divide evenly over "
                             f"{self.world} processes; use a multiple of {self.world}")
        n_loc = bs // self.world
        self.rows = slice(self.rank * n_loc, (self.rank + 1) * n_loc)
        self.precision = tc.precision  # "fp32" | "bf16", checked by TokenizerSettings
        torch.manual_seed(self.seed)
        device = self.device
        self.train = dataset(cfg, "train")
        self.prior = load_prior(node)
        self.arch = stage1_architecture(cfg, self.prior, tc)
        if self.arch is None:
            self.tok = build_tokenizer_for(cfg).train().to(device)
            self.prior_norm = None
        else:
            # The paper's DM stage starts from stage 1, unfrozen: the prior's backbone + MLP and
            # decoder, with the bank's normalisation between the latents and the matching loss.
            self.tok = build_tokenizer_for(cfg, arch=self.arch)
            self.tok.load_state_dict({**self.tok.state_dict(), **self.prior.stage1_weights()})
            self.tok = self.tok.train().to(device)
            self.prior_norm = self.prior.stage1_norm()
        channels_last(self.tok, device)
        self.match = build_matching_loss(node, self.prior).to(device)  # moves dm's fake/teacher, discriminators
        self.p_weight = tc.perceptual_weight
        if self.p_weight > 0 and tc.perceptual is None:
            raise ValueError("tokenizer.perceptual_weight > 0 needs tokenizer.perceptual (mobilenet_v2 | lpips-vgg)")
        self.perceptual = build_perceptual(tc.perceptual).to(device) if self.p_weight > 0 else None
        gcfg = dict(tc.gan or {})
        channels = DatasetSettings.from_dict(cfg["dataset"], "dataset").channels
        self.gan = PatchGAN(channels, **gcfg).to(device) if float(gcfg.get("weight", 0)) > 0 else None
        if self.gan is not None:
            channels_last(self.gan.disc, device)
        self.opt = adamw(self.tok.parameters(), self.device, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        # With the stage-1 start the reference stage's stage 1 was the warm-up.
        self.w_it = 0 if self.arch is not None else tc.warmup_iters
        # The scheduler counts tokenizer updates, one per warm-up iteration: from update w_it on
        # (the DM stage) the rate is match_lr, the rate the dm loss's fake also trains at.
        warm, ratio, w_it = warmup_lambda(tc.lr_warmup_steps), (tc.match_lr or tc.lr) / tc.lr, self.w_it
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: warm(s) * (ratio if s >= w_it else 1.0))
        self.m_it, self.f_it = tc.match_iters, tc.finetune_iters
        self.total = self.w_it + self.m_it + self.f_it
        self.frozen_warmup = tc.warmup_frozen_encoder
        self.data_rng = torch.Generator().manual_seed(self.seed + 7)
        self.loader = _file_loader(cfg, self.train, bs, self.rank, self.world, self.seed + 7, self.device)
        self.ckpt = Checkpoint(node.dir / "ckpt.pt", tc.checkpoint_every)
        self.shape = tuple(self.tok.latent_shape)
        self.logs: dict[str, float] = {}
        # Latent statistics over training on a fixed batch (rank 0): do they settle before the
        # DM phase ends? (latent_curve.json)
        self.curve: list[dict] = []
        self.stats_x = subset(self.train, 512, seed=self.seed + 5).float_batch(torch.arange(min(512, len(self.train)))) \
            if tc.stats_every > 0 else None

    # ---- checkpoints

    def resume(self) -> int:
        """Load the last checkpoint (every rank reads the same file); returns the next iteration."""
        start = 0
        if (state := self.ckpt.load()) is not None:
            self.tok.load_state_dict(state["tok"]); self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"]); self.match.load_state_dict(state["match"])
            self.match.load_extra_state(state["match_extra"]); self.data_rng.set_state(state["data_rng"])
            if self.loader is not None:
                self.loader.load_state_dict(state["data_loader"])
            self.curve = list(state.get("curve", []))
            if self.gan is not None:
                self.gan.load_state_dict(state["gan"]); self.gan.opt.load_state_dict(state["gan_opt"])
            start = state["step"]
        distributed.barrier()  # all ranks have read ckpt.pt before rank 0 may replace it
        return start

    def save(self, next_it: int) -> None:
        gan = self.gan
        extra = {"gan": gan.state_dict(), "gan_opt": gan.opt.state_dict()} if gan is not None else {}
        if self.loader is not None:  # epoch and position: a resumed run continues the same order
            extra["data_loader"] = self.loader.state_dict()
        self.ckpt.save(next_it, tok=_plain_state(self.tok), opt=self.opt.state_dict(), sched=self.sched.state_dict(),
                       match=self.match.state_dict(), match_extra=self.match.extra_state(),
                       data_rng=self.data_rng.get_state(), curve=self.curve, **extra)

    # ---- pieces of a step

    def autocast(self):
        # bf16 autocast (the paper's setting) on CUDA, and on CPUs with bf16 units; fp32 weights
        # and optimiser state either way.
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def norm(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior_norm.normalize(z) if self.prior_norm is not None else z

    def phase(self, it: int) -> str:
        return "warmup" if it < self.w_it else ("match" if it < self.w_it + self.m_it else "finetune")

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images and the global batch's labels (every rank draws the global batch).
        File-backed sets stream through the sharded loader (epochs without replacement, each rank
        decoding only its rows); in-memory sets keep the original draw with replacement, so their
        results do not change."""
        if self.loader is not None:
            x, y_all = self.loader.next()
            return x.to(self.device, non_blocking=True).float().div_(255.0), y_all.to(self.device)
        idx = torch.randint(len(self.train), (self.bs,), generator=self.data_rng)
        return self.train.float_batch(idx[self.rows]).to(self.device), self.train.labels[idx].to(self.device)

    def reconstruction(self, x_rec: torch.Tensor, x: torch.Tensor, it: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, reconstruction part without the GAN term, logs)"""
        tc, gan = self.tc, self.gan
        x_rec = x_rec.float()
        rec = pixel_loss(x_rec, x, tc.l1_weight, tc.l2_weight)
        out = {}
        if self.perceptual is not None:
            p = self.perceptual(x_rec, x)
            rec = rec + self.p_weight * p
            out["perceptual"] = float(p.detach())
        if gan is None or not gan.active(it):
            return rec, rec, out
        aug = _aug_generator(self.seed, it, "g", self.device)
        g_loss = hinge_g_loss(gan.logits(gan.augment(x_rec, aug, self.bs, self.rows.start)))
        w = adaptive_weight(rec, g_loss, self.tok.decoder.last_layer, gan.max_weight,
                            reduce=distributed.all_reduce_mean)
        out.update(gan_g=float(g_loss.detach()), gan_adaptive_w=float(w))
        return rec + gan.weight * w * g_loss, rec, out

    def optimise(self, loss: torch.Tensor, rec: torch.Tensor, params: list, what: str, it: int) -> None:
        """Finite check over ranks, backward, gradient mean over ranks, clip, step."""
        check_finite(distributed.all_reduce_mean(loss.detach()), f"tokenizer/{what}", it)
        self.opt.zero_grad(set_to_none=True); loss.backward()
        average_grads(params)
        self.logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip))
        self.opt.step(); self.sched.step()
        self.logs["rec"] = float(distributed.all_reduce_mean(rec.detach()))

    # ---- the three phases

    def finetune_step(self, x: torch.Tensor, it: int) -> torch.Tensor:
        """Phase 3: decoder only; encoder and bottleneck frozen (they get no gradient)."""
        with torch.no_grad(), self.autocast():
            z = self.tok.encode(x).float()
        with self.autocast():
            x_rec = self.tok.decode(z)
            loss, rec, rlogs = self.reconstruction(x_rec, x, it)
        self.logs.update(rlogs)
        self.optimise(loss, rec, list(self.tok.decoder.parameters()), "finetune", it)
        return x_rec

    def tokenizer_step(self, x: torch.Tensor, y_all: torch.Tensor, eps: torch.Tensor | None, phase: str,
                       it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Phases 1-2: reconstruction, plus lambda x the matching loss on the gathered global
        batch of latents in phase 2. Returns (reconstruction, detached latents)."""
        tok, match = self.tok, self.match
        with self.autocast():
            mean, logvar = tok.posterior(x, freeze_encoder=self.frozen_warmup and phase == "warmup")
            mean = mean.float(); logvar = None if logvar is None else logvar.float()
            z = mean if logvar is None else mean + (0.5 * logvar).exp() * eps
            x_rec = tok.decode(z)
            loss, rec, rlogs = self.reconstruction(x_rec, x, it)
            if phase == "match" and match.weight > 0:
                zg, mg, lg = (gather_rows(t, self.rank) for t in (z, mean, logvar))
                post = (mg, lg) if lg is not None else None
                m_loss, mlogs = match(self.norm(zg.float()), y_all, it, posterior=post)
                # x world: the gradient averaging divides it back (each rank's rows get their
                # share of d loss / d z once, from their own rank).
                loss = loss + self.world * match.weight * m_loss
                self.logs.update(mlogs)
        self.logs.update(rlogs)
        self.optimise(loss, rec, list(tok.parameters()), phase, it)
        return x_rec, z.detach()

    def matching_networks_step(self, z_det: torch.Tensor, y_all: torch.Tensor, it: int) -> None:
        """The loss's own networks track q(z): from the first iteration on, or from the matching
        phase on for losses with ``update_in_warmup = False`` (dm, as the paper's DM stage)."""
        with self.autocast():
            if self.match.update_sharded:
                # This rank's rows only: the loss draws for the global batch and averages its
                # networks' gradients over ranks (dm's fake), instead of repeating the whole step.
                logs = self.match.update(self.norm(z_det), y_all, it, rows=self.rows)
            else:
                logs = self.match.update(self.norm(gather_rows(z_det, self.rank)), y_all, it)
            self.logs.update(logs)

    def disc_step(self, x: torch.Tensor, x_rec: torch.Tensor, it: int) -> None:
        gan, bs, off = self.gan, self.bs, self.rows.start
        with self.autocast():
            real = gan.logits(gan.augment(x, _aug_generator(self.seed, it, "real", self.device), bs, off))
            fake = gan.logits(gan.augment(x_rec.detach().float(), _aug_generator(self.seed, it, "fake", self.device),
                                          bs, off))
            d_loss = hinge_d_loss(real.float(), fake.float())
        gan.opt.zero_grad(set_to_none=True); d_loss.backward()
        average_grads(gan.disc.parameters())
        gan.opt.step()
        self.logs["gan_d"] = float(d_loss.detach())

    def iteration(self, it: int) -> None:
        x, y_all = self.batch()
        phase = self.phase(it)
        x_rec = None
        if phase == "finetune":
            x_rec = self.finetune_step(x, it)
        else:
            step_tok = phase == "warmup" or (it - self.w_it) % self.match.tokenizer_every == 0
            # Drawn for the whole global batch from the shared RNG, so that every rank's stream
            # stays identical (one process draws exactly randn_like of its latents).
            eps = torch.randn((self.bs, *self.shape), device=self.device)[self.rows] \
                if self.tok.stochastic and step_tok else None
            if step_tok:
                x_rec, z_det = self.tokenizer_step(x, y_all, eps, phase, it)
            else:
                with torch.no_grad(), self.autocast():
                    z_det = self.tok.encode(x).float()
            if phase == "match" or self.match.update_in_warmup:
                self.matching_networks_step(z_det, y_all, it)
        if self.gan is not None and x_rec is not None and self.gan.active(it):
            self.disc_step(x, x_rec, it)

    def stats_due(self, done: int) -> bool:
        every = self.tc.stats_every
        return every > 0 and (done % every == 0 or done == self.total)

    @torch.no_grad()
    def record_stats(self, done: int) -> None:
        """Std and mean of the (matching-space) latents of the fixed batch, and their sliced
        Wasserstein distance to samples of p_ref, after ``done`` iterations."""
        with self.autocast():
            z = self.norm(self.tok.encode(self.stats_x.to(self.device)).float()).cpu()
        self.curve.append({"iter": done, "phase": self.phase(max(done - 1, 0)), "latent_std": float(z.std()),
                           "latent_mean": float(z.mean()), "swd_to_prior": _swd_to_prior(z, self.prior)})

    # ---- the end

    def finish(self, start: int, elapsed: float) -> dict:
        """Latent normalisation, weights and the record (rank 0)."""
        from tokenizers import LatentNorm
        tok, tc = self.tok.eval(), self.tc
        z_all = encode_all(tok, subset(self.train, tc.norm_images, seed=self.seed), device=self.device)
        lnorm = LatentNorm.fit(z_all)
        save_torch(self.node.dir / "tokenizer.pt", {k: v.cpu() for k, v in _plain_state(tok).items()})
        if self.arch is not None:
            write_json(self.node.dir / ARCH_FILE, self.arch)
        lnorm.save(self.node.dir / "latent_norm.json")
        swd = _swd_to_prior(self.norm(z_all), self.prior)
        self.ckpt.remove()
        total, bs, gan, perceptual = self.total, self.bs, self.gan, self.perceptual
        write_json(self.node.dir / "final_logs.json", self.logs)
        if self.curve:
            write_json(self.node.dir / "latent_curve.json", self.curve)
        return {"latent_mean": lnorm.mean, "latent_scale": lnorm.scale, "latent_swd_to_prior": swd,
                "latent_std_to_prior": float(self.norm(z_all).std()),  # N(0, I) and banks: 1 when matched
                "tokenizer_iters": total, "tokenizer_iters_per_s": (total - start) / max(elapsed, 1e-9),
                "tokenizer_images_per_s": (total - start) * bs / max(elapsed, 1e-9),
                "tokenizer_world_size": self.world, "tokenizer_precision": self.precision,
                "tokenizer_design": describe_design(self.arch or self.cfg["tokenizer"], self.arch is not None),
                "tokenizer_warmup_iters": self.w_it,
                "tokenizer_compile": tc.compile,
                "perceptual": perceptual.name if perceptual is not None else "none",
                "perceptual_weight": self.p_weight,
                "final_rec_loss": self.logs.get("rec", float("nan")), **self.match.describe(),
                **(gan.describe() if gan is not None else {"gan": "none"}),
                **({"data_bad_images": self.train.bad_images, "data_epochs": self.loader.sampler.epoch
                    + self.loader.sampler.position / self.loader.sampler.steps_per_epoch}
                   if self.loader is not None else {})}


def _file_loader(cfg: dict, train, batch_size: int, rank: int, world: int, seed: int, device: torch.device):
    """The sharded, resumable loader for a file-backed training set (None for in-memory sets)."""
    from benchmark.datasets import is_file_backed
    from benchmark.datasets.loader import ShardSampler, ShardedLoader
    d = DatasetSettings.from_dict(cfg["dataset"], "dataset")
    if not is_file_backed(d.name):
        if d.hflip:
            log.warning("dataset.hflip applies to file-backed datasets; %s keeps its in-memory draw unflipped", d.name)
        return None
    sampler = ShardSampler(len(train), batch_size, rank, world, seed, hflip=d.hflip)
    return ShardedLoader(train, sampler, workers=d.workers, pin_memory=device.type == "cuda")


def stage1_architecture(cfg: dict, prior, tc: TokenizerSettings) -> dict | None:
    """The tokenizer section rebuilding the prior's stage-1 model, when the design asks for it
    and the prior has one (feature priors); None = the preset's encoder and decoder."""
    if tc.design != "stage1" or not callable(getattr(prior, "stage1_architecture", None)):
        return None
    if LOSSES.get(cfg["loss"]["name"]).needs_posterior:
        raise ValueError(f"tokenizer.design=stage1 starts from the deterministic stage-1 model of prior "
                         f"{cfg['prior']['name']!r}, but loss {cfg['loss']['name']!r} needs a stochastic "
                         f"encoder; use tokenizer.design=preset")
    return prior.stage1_architecture(DatasetSettings.from_dict(cfg["dataset"], "dataset").resolution)


def describe_design(section: dict, stage1: bool) -> str:
    """One line for the tables: what the encoder and decoder are."""
    enc, dec = section["encoder"], section["decoder"]
    if enc["name"] == "backbone":
        e = f"{enc['backbone']['name']} backbone + MLP"
    else:
        e = f"{enc['name']} encoder (ch {enc.get('ch', enc.get('embed_dim', '?'))})"
    d = f"{dec['name']} decoder (ch {dec.get('ch', '?')})"
    return f"{'stage-1 start: ' if stage1 else ''}{e}, {d}"


def run(node: Node) -> dict:
    t = TokenizerTraining(node)
    start = t.resume()
    # Compiled in place (nn.Module.compile): state_dict keys stay those of the plain modules.
    if t.tc.compile:
        compile_in_place(t.tok.encoder); compile_in_place(t.tok.decoder)
    t0 = time.perf_counter()
    bar = progress(t.total, "tokenizer", start) if t.info.is_main else tqdm(disable=True)
    mon = TrainMonitor("tokenizer", node.dir, t.total, start, unit="img", is_main=t.info.is_main)
    if t.info.is_main and start == 0 and t.stats_x is not None:
        t.record_stats(0)
    for it in range(start, t.total):
        t.iteration(it)
        if t.info.is_main and t.stats_due(it + 1):
            t.record_stats(it + 1)
        bar.update(1)
        logs = dict(t.logs)
        # The loss line is the reconstruction term; the matching terms and the phase go beside it.
        mon.step(it + 1, logs.pop("rec", float("nan")), lr=t.opt.param_groups[0]["lr"],
                 grad_norm=logs.pop("grad_norm", None), items=t.bs,
                 **{k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if bar.disable is False:
            bar.set_postfix({k: f"{v:.3g}" for k, v in t.logs.items()})
        if t.info.is_main and t.ckpt.due(it + 1) and it + 1 < t.total:
            t.save(it + 1)
    bar.close()
    mon.close()
    elapsed = time.perf_counter() - t0
    return t.finish(start, elapsed) if t.info.is_main else {}


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
