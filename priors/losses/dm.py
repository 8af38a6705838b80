"""The distribution-matching loss of DMVAE (Ye et al. 2025, Sec. 3; DMD-style).

Two score networks over latents: a frozen teacher for p_ref (a trained network, or a prior's
exact velocity), and a fake network trained online on detached encoder latents so that it
tracks q(z). The tokenizer receives g = (x_hat_fake - x_hat_real) / mean|z - x_hat_real| per
sample through the stop-gradient target 0.5 * ||z - sg(z - g)||^2, i.e. d loss / d z = g / numel.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmark.accel import compile_in_place
from generators import build_generator, flow_matching_loss, guided_velocity, sample_t
from generators import interpolate, velocity_target, velocity_to_x1
from priors.base import ExactTeacher
from priors.losses.base import MatchingLoss, average_gradients, config_kwargs
from priors.registry import LOSSES


TEACHER_MODES = ("auto", "exact", "trained")
FAKE_INITS = ("pretrained", "random")


def fake_pretrain_needed(cfg: dict[str, Any]) -> bool:
    """Whether a dm cell trains a network on p_ref only to start its fake from (the teacher is
    the prior's exact score). The paper starts the fake as a copy of a network that already
    models p_ref (its teacher); with an exact teacher there is no such network unless one is
    trained, and a fake from random weights gives a spurious gradient larger than the signal
    at the start of the DM phase (measured: benchmark/dm_fidelity.py, README)."""
    return cfg["loss"].get("fake_init", "pretrained") == "pretrained" and not needs_trained_teacher(cfg)


def needs_trained_teacher(cfg: dict[str, Any]) -> bool:
    """Whether a dm cell trains its teacher: ``loss.teacher=trained``, or ``auto`` with a prior
    that has no closed-form score. ``exact`` with such a prior is an error."""
    from priors.base import has_exact_velocity
    from priors.registry import PRIORS
    mode = cfg["loss"].get("teacher", "auto")
    if mode == "trained":
        return True
    has_exact = has_exact_velocity(PRIORS.get(cfg["prior"]["name"]))
    if mode == "exact" and not has_exact:
        raise ValueError(f"loss.teacher=exact but prior {cfg['prior']['name']!r} has no closed-form score; "
                         f"use loss.teacher=trained or auto")
    return not has_exact


@LOSSES.register("dm")
class DistributionMatching(MatchingLoss):
    # `teacher` (auto | exact | trained) decides what from_config passes as the teacher network;
    # the teacher_* keys are the teacher stage's (benchmark/stages/teacher.py).
    # The paper's DM stage starts after stage 1 with the fake as a copy of the teacher; a fake
    # trained on the warm-up's latents would start the DM phase somewhere else (and drift: with
    # q = p_ref, 130 warm-up steps at lr 3e-4 took its error from 0.10 to 0.18 of the 1.5x signal).
    update_in_warmup = False
    # With N processes each rank trains the fake on its own 1/N of the batch and the gradients
    # are averaged, instead of every rank repeating the whole batch's step (issue #15).
    update_sharded = True
    config_keys_read_elsewhere = ("teacher", "teacher_steps", "teacher_batch_size", "teacher_lr",
                                  "teacher_checkpoint_every", "teacher_plateau", "teacher_seed", "fake_init")

    @classmethod
    def upstream(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """A score network trained on samples of p_ref (the ``teacher`` stage, after the
        reference stage fitted the prior): the teacher itself when the prior has no exact score
        (or loss.teacher=trained), else, with ``fake_init: pretrained``, only the fake's
        starting point (role ``fake_init``; the exact score stays the teacher)."""
        from benchmark.upstream import Need
        trained = needs_trained_teacher(cfg)
        if not trained and not fake_pretrain_needed(cfg):
            return {}
        loss = cfg["loss"]
        params = {k: loss[k] for k in ("score_net", "score_net_args", "teacher_steps", "teacher_batch_size",
                                       "teacher_lr")}
        if loss.get("teacher_plateau"):
            # Only when set, so that stage keys of configs without a plateau rule stay as they were.
            params["teacher_plateau"] = loss["teacher_plateau"]
        # Seeded by teacher_seed, not the cell's seed: the teacher models p_ref, which the reference
        # stage fits once for every seed of a prior, so one teacher serves them all (as the
        # reference does) instead of training one per seed.
        params.update(num_classes=cfg["dataset"]["num_classes"], seed=int(loss.get("teacher_seed", 0)))
        return {"teacher" if trained else "fake_init": Need("teacher", params, after=("reference",))}

    @classmethod
    def validate(cls, cfg: dict[str, Any]) -> None:
        super().validate(cfg)
        from generators import GENERATORS
        loss = cfg["loss"]
        if loss.get("teacher") not in TEACHER_MODES:
            raise ValueError(f"loss.teacher must be auto, exact or trained; got {loss.get('teacher')!r}")
        if loss.get("fake_init", "pretrained") not in FAKE_INITS:
            raise ValueError(f"loss.fake_init must be pretrained or random; got {loss.get('fake_init')!r}")
        if loss.get("score_net") not in GENERATORS:
            raise ValueError(f"unknown generator {loss.get('score_net')!r} for loss.score_net. "
                             f"Known generators: {', '.join(sorted(GENERATORS))}")
        needs_trained_teacher(cfg)  # loss.teacher=exact on a prior without an exact score

    @classmethod
    def from_config(cls, loss_cfg: dict[str, Any], *, inputs: dict[str, Any], prior: Any = None,
                    **runner_args: Any) -> "DistributionMatching":
        """The teacher is the trained network of the ``teacher`` stage when upstream declared
        one, else the prior's exact score, with the fake started from the ``fake_init``
        network when there is one. The fake's optimiser settings left null take the tokenizer's
        (``runner_args["tokenizer_optim"]``: the paper trains VAE and fake with one recipe).
        DM CFG needs labels: with a prior that ignores them (N(0, I), GMM, a class subset) the
        teacher's conditional and unconditional fields are the same, so guidance would scale
        only the fake's label signal; the scale is then 1 and the record says so."""
        teacher = inputs.get("teacher")
        kind = "trained" if teacher is not None else "exact"
        if teacher is None:
            teacher = ExactTeacher(prior)
        kwargs = config_kwargs(cls, loss_cfg)
        optim = runner_args.get("tokenizer_optim") or {}
        for key, tok_key in (("fake_lr", "lr"), ("fake_warmup_steps", "warmup_steps"), ("fake_grad_clip", "grad_clip")):
            if kwargs.get(key) is None and tok_key in optim:
                kwargs[key] = optim[tok_key]
        if prior is not None:
            kwargs["cfg_scale"] = cls.effective_cfg_scale(float(kwargs.get("cfg_scale", 1.0)), prior,
                                                          getattr(prior, "classes", None))
        return cls(**kwargs, teacher=teacher, teacher_kind=kind, latent_shape=runner_args["latent_shape"],
                   num_classes=runner_args["num_classes"], fake_init=inputs.get("fake_init"))

    @staticmethod
    def effective_cfg_scale(cfg_scale: float, prior: Any, classes: Any = None) -> float:
        """The DM CFG scale a prior gets: ``cfg_scale`` for a class-conditional prior over all its
        classes, 1 for one that ignores labels or keeps a class subset (see from_config). ``prior``
        may be the prior or its class (the plan has only the config)."""
        if not getattr(prior, "class_conditional", False) or classes is not None:
            return 1.0
        return cfg_scale

    def __init__(self, weight: float = 1.0, *, teacher: nn.Module, latent_shape: tuple[int, ...],
                 num_classes: int, t_range: tuple[float, float] = (0.0, 1.0),
                 cfg_scale: float = 1.0, vae_train_every: int = 5, fake_lr: float | None = 2e-4,
                 fake_betas: tuple[float, float] = (0.9, 0.95), fake_weight_decay: float = 0.005,
                 fake_warmup_steps: int | None = 0, fake_grad_clip: float | None = None,
                 score_net: str = "Tiny", score_net_args: dict | None = None,
                 teacher_kind: str = "trained", fake_init: nn.Module | None = None,
                 compile: bool = False) -> None:
        super().__init__(weight)
        t0, t1 = map(float, t_range)
        if not 0.0 <= t0 < t1 <= 1.0:
            raise ValueError(f"dm t_range must satisfy 0 <= t0 < t1 <= 1, got {t_range}")
        if vae_train_every < 1:
            raise ValueError(f"dm vae_train_every must be >= 1, got {vae_train_every}")
        self.t_range = (t0, t1)
        self.cfg_scale = float(cfg_scale)
        self.tokenizer_every = int(vae_train_every)
        self.teacher_kind = teacher_kind
        self.teacher = teacher.eval().requires_grad_(False)
        if isinstance(teacher, nn.Module) and any(True for _ in teacher.parameters()):
            # The paper initialises the fake network as a copy of the teacher.
            self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
            self.fake_init = "teacher"
        elif fake_init is not None:
            # Exact teacher: the fake starts from a network pre-trained on p_ref instead.
            self.fake = copy.deepcopy(fake_init).train().requires_grad_(True)
            self.fake_init = "pretrained"
        else:
            c, h, w = latent_shape
            self.fake = build_generator(score_net, input_size=h, in_channels=c,
                                        num_classes=num_classes, **(score_net_args or {}))
            self.fake_init = "random"
        if compile:
            # In place (nn.Module.compile), so state_dict keys, checkpoints and the teacher copy
            # are the plain modules'; an exact teacher has no network to compile.
            compile_in_place(self.fake)
            if isinstance(self.teacher, nn.Module) and any(True for _ in self.teacher.parameters()):
                compile_in_place(self.teacher)
        if fake_lr is None:
            raise ValueError("dm fake_lr is null (= the tokenizer's lr) but no tokenizer lr was given")
        self.fake_lr = float(fake_lr)
        self.fake_grad_clip = None if fake_grad_clip is None else float(fake_grad_clip)
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=self.fake_lr,
                                          betas=tuple(fake_betas), weight_decay=fake_weight_decay)
        warm = max(1, int(fake_warmup_steps or 0))
        self.fake_sched = torch.optim.lr_scheduler.LambdaLR(self.fake_opt, lambda s: min(1.0, (s + 1) / warm))

    def update(self, z: torch.Tensor, labels: torch.Tensor, step: int,
               rows: slice | None = None) -> dict[str, float]:
        """One flow-matching step of the fake network on the current (detached) latents.

        ``rows``: ``z`` holds only these rows of a global batch of ``len(labels)`` (this
        rank's slice in data-parallel training; ``labels`` are the global batch's). The step
        then draws noise, t and label dropout for the whole global batch in the order one
        process draws them, keeps its rows, and averages the gradient over ranks before the
        (clipped) AdamW step: the equal-sized slices' mean losses average to the global batch's
        mean, so N processes take the step one process takes, each doing 1/N of the work, and
        every rank ends with the same averaged gradient and so the same fake and optimiser
        state. None, or rows covering the batch (one process), is the one-process step itself."""
        self.fake.train()
        z = z.detach()
        whole = rows is None or (z.shape[0] == labels.shape[0] and rows.start in (0, None))
        if whole:
            loss = flow_matching_loss(self.fake, z, labels)
        else:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"dm update got rows {rows} of a batch of {labels.shape[0]} but there is no "
                                   f"process group to average the fake network's gradients over")
            if labels.shape[0] % z.shape[0] or z.shape[0] * dist.get_world_size() != labels.shape[0]:
                # The mean of the ranks' mean losses is the batch's mean only for equal slices.
                raise ValueError(f"dm update got {z.shape[0]} rows of a batch of {labels.shape[0]} on "
                                 f"{dist.get_world_size()} ranks; the slices must be equal")
            loss = self.rows_loss(z, labels, rows)
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        if not whole:
            # One flat all-reduce by hand rather than a DistributedDataParallel wrapper: the fake
            # is also called forward-only (no_grad, eval) in direction(), which must see the
            # plain module; DDP would prefix the state_dict keys that checkpoints and the teacher
            # copy share, and expects a backward after every training-mode forward. The logged
            # loss rides in the same buffer, so the step costs one collective.
            (loss,) = average_gradients(self.fake.parameters(), loss)
        if self.fake_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.fake_grad_clip)
        self.fake_opt.step()
        self.fake_sched.step()
        return {"fake_fm": float(loss.detach())}

    def rows_loss(self, z: torch.Tensor, labels: torch.Tensor, rows: slice) -> torch.Tensor:
        """``flow_matching_loss`` of the fake on rows ``rows`` of a global batch of
        ``len(labels)`` whose rows ``z`` are, with that batch's draws: noise (randn of the
        global shape), t, then the label dropout FlowDiT draws in training mode, from torch's
        global RNG in that order, so that the RNG ends where one process's step leaves it and
        each rank's rows get the values one process gives them. The dropout is applied here on
        the global labels (as LabelEmbedder does) and the fake runs in eval mode so that it
        does not draw again; its only training-mode behaviour is that dropout."""
        n = labels.shape[0]
        eps = torch.randn((n, *z.shape[1:]), device=z.device, dtype=z.dtype)[rows]
        t = sample_t(n, "uniform", device=z.device)[rows]
        emb = self.fake.y_embedder
        y = labels
        if emb.dropout_prob > 0:
            u = torch.rand(n, device=labels.device)
            y = torch.where(u < emb.dropout_prob, torch.full_like(labels, emb.num_classes), labels)
        self.fake.eval()
        try:
            v = self.fake(interpolate(z, eps, t), t, y[rows])
        finally:
            self.fake.train()
        return F.mse_loss(v.float(), velocity_target(z, eps).float())

    def direction(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """g: the per-sample-normalised difference of the two clean-data estimates."""
        with torch.no_grad():
            zd = z.detach()
            t = sample_t(zd.shape[0], "uniform", t_range=self.t_range, device=zd.device)
            x_t = interpolate(zd, torch.randn_like(zd), t)
            was_training = self.fake.training
            self.fake.eval()  # no label dropout while scoring
            v_fake = guided_velocity(self.fake, x_t, t, labels, self.cfg_scale)
            self.fake.train(was_training)
            v_real = guided_velocity(self.teacher, x_t, t, labels, self.cfg_scale)
            x_fake = velocity_to_x1(x_t, v_fake, t)
            x_real = velocity_to_x1(x_t, v_real, t)
            norm = (zd - x_real).abs().mean(dim=tuple(range(1, zd.dim())), keepdim=True)
            g = (x_fake - x_real) / norm
            return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def forward(self, z, labels, step, posterior=None):
        g = self.direction(z, labels)
        target = (z - g).detach()
        loss = 0.5 * (z - target).pow(2).mean()
        return loss, {"dm": float(loss.detach()), "dm_grad_norm": float(g.norm() / g.numel() ** 0.5)}

    def extra_state(self) -> dict[str, Any]:
        return {"fake_opt": self.fake_opt.state_dict(), "fake_sched": self.fake_sched.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.fake_opt.load_state_dict(state["fake_opt"])
        if "fake_sched" in state:
            self.fake_sched.load_state_dict(state["fake_sched"])

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.weight, "dm_teacher": self.teacher_kind, "dm_fake_init": self.fake_init,
                "dm_fake_lr": self.fake_lr, "dm_cfg": self.cfg_scale, "dm_t_range": list(self.t_range),
                "dm_vae_train_every": self.tokenizer_every}
