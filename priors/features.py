"""Feature priors: p_ref is the distribution of a frozen backbone's features, projected to the
latent shape by the frozen-backbone stage (DMVAE stage 1, DMVAE_METHOD.md).

Stage 1, as run here (in the prior's ``fit``, i.e. the grid's ``reference`` stage):
1. extract the backbone's feature grid for ``n_images`` training images, pooled to the latent
   grid (adaptive average pooling) when the backbone's grid is finer;
2. train a per-position bottleneck MLP (1x1 convs, D -> hidden -> C, SiLU, as the paper's
   1024 -> 2048 -> 32 MLP) together with a decoder to reconstruct the images, backbone frozen;
   the decoder makes the projection keep what the features know about the image;
3. the projected features of those images, normalised by one scalar mean and scale (as latents
   are normalised before any diffusion model), are the reference bank; ``sample`` draws from it,
   per class when labels are given.
The stage-1 model (backbone, feature standardisation, MLP, decoder and the bank's mean/scale) is
kept with the bank. With ``tokenizer.design: stage1`` (the paper's recipe) the cell's DM stage
starts from it, everything unfrozen: the encoder is the backbone plus this MLP and the decoder is
this decoder, so each image starts at its own projected features (q = p_ref at the first DM
step, image by image) instead of a fresh encoder that could match the bank only in aggregate.
With ``tokenizer.design: preset`` every prior gets the preset's conv encoder instead, pulled
towards the bank by the matching loss (one architecture across priors; an ablation).

Stage 1 runs on the reference stage's device and, under torchrun / srun tasks, data parallel
(``FitContext.dist``; issue #15): step 1 is sharded over the ranks in fixed batches and
all-gathered, so the features are bit-identical whatever the number of processes; step 2 keeps
``stage1.batch_size`` as the global batch, each rank computing its slice with gradients averaged,
so N processes train the weights one process trains up to the order of float sums
(tests/test_reference_ddp.py); step 3 runs on every rank alike. One process computes exactly what
the stage computed before it was data parallel.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from priors.base import FitContext
from priors.registry import PRIORS

log = logging.getLogger(__name__)


class BankPrior:
    """A prior given by a bank of reference latents (with labels): the empirical distribution."""
    class_conditional = True

    def __init__(self, latent_shape: Sequence[int], classes: Sequence[int] | None = None) -> None:
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.classes = None if classes is None else [int(c) for c in classes]
        self.bank = torch.empty(0, *self.latent_shape)
        self.labels = torch.empty(0, dtype=torch.long)
        self.info: dict[str, Any] = {}

    def _set_bank(self, bank: torch.Tensor, labels: torch.Tensor) -> None:
        if tuple(bank.shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name}: reference latents have shape {tuple(bank.shape[1:])}, "
                             f"expected {self.latent_shape}")
        if self.classes is not None:
            keep = torch.isin(labels, torch.tensor(self.classes))
            if not keep.any():
                raise ValueError(f"{self.name}: no reference latents in classes {self.classes}")
            bank, labels = bank[keep], labels[keep]
        self.bank, self.labels = bank.float().contiguous(), labels.long().contiguous()
        self._by_class = None
        self.stage1_model: dict[str, Any] | None = None

    def _index(self, n: int, generator: torch.Generator | None, labels: torch.Tensor | None) -> torch.Tensor:
        if len(self.bank) == 0:
            raise RuntimeError(f"{self.name}: prior is not fitted (empty reference bank)")
        idx = torch.randint(len(self.bank), (n,), generator=generator)
        if labels is None or self.classes is not None:
            # A class subset is a restriction of the data, not a conditional model: its samples
            # ignore the requested labels (as SubDINO's reference ignores the other classes).
            return idx
        if self._by_class is None:
            self._by_class = {int(c): (self.labels == c).nonzero().flatten() for c in self.labels.unique()}
        u = torch.rand(n, generator=generator)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().flatten()
            pool = self._by_class.get(int(c))
            if pool is None or len(pool) == 0:  # a label the bank has not seen: any sample
                continue
            idx[rows] = pool[(u[rows] * len(pool)).long().clamp_max(len(pool) - 1)]
        return idx

    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.bank[self._index(n, generator, labels)].clone()

    def state_dict(self) -> dict[str, Any]:
        out = {"bank": self.bank.clone(), "labels": self.labels.clone(),
               "info": {k: v for k, v in self.info.items()}}
        if getattr(self, "stage1_model", None) is not None:
            out["stage1_model"] = self.stage1_model
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["bank"].shape[1:]) != self.latent_shape:
            raise ValueError(f"{self.name} state has latent shape {tuple(state['bank'].shape[1:])}, "
                             f"expected {self.latent_shape}")
        self.bank, self.labels = state["bank"].float(), state["labels"].long()
        self.info = dict(state.get("info", {}))
        self._by_class = None
        self.stage1_model = state.get("stage1_model")

    def describe(self) -> dict[str, Any]:
        return dict(self.info)


@torch.no_grad()
def extract_features(backbone: nn.Module, images, grid: int, batch_size: int = 256,
                     precision: str = "fp32", info=None) -> torch.Tensor:
    """Backbone features of every image, on the latent grid: [N, D, grid, grid], on ``info``'s
    device (a benchmark.distributed.DistInfo; None: one process on the CPU), where the backbone
    must already be.

    The images go through in fixed batches of ``batch_size`` (batch k: images k*batch_size
    onwards), whatever the number of processes: a kernel may round differently for another batch
    size, and an image's features must not depend on how many ranks shared the work. With N
    ranks, batch k is computed by rank k % N and every rank ends with all the features, in image
    order (benchmark.distributed.sharded_batches with ``to_all``: [batch, ``backbone.out_dim``,
    grid, grid] rows, all-gathered round by round)."""
    from benchmark.distributed import DistInfo, sharded_batches
    info = info or DistInfo()
    backbone.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None

    def batch(idx: torch.Tensor) -> torch.Tensor:
        x = images.float_batch(idx).to(info.device)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            f = backbone(x).float()
        if f.shape[-1] != grid:
            if f.shape[-1] < grid:
                raise ValueError(f"backbone grid {f.shape[-1]}x{f.shape[-1]} is coarser than the latent grid "
                                 f"{grid}x{grid}: raise the backbone's input_size")
            f = F.adaptive_avg_pool2d(f, grid)
        return f

    # to_all: stage 1 trains on every rank, so every rank needs every image's features.
    rows = (int(backbone.out_dim), grid, grid)
    return torch.cat(list(sharded_batches(len(images), batch_size, batch, info, "backbone features", to_all=rows)))


# The frozen-backbone stage's settings and their defaults; also the keys `prior.stage1` may hold
# (benchmark/plugin_keys.py refuses others).
STAGE1_DEFAULTS: dict[str, Any] = {
    "iters": 300, "batch_size": 64, "lr": 1e-3, "hidden": 0, "checkpoint_every": 100,
    "compile": False,  # torch.compile the MLP and decoder (how, not what: in no stage key)
    "decoder": {"name": "conv", "ch": 16, "mult": [1, 2, 2], "num_res_blocks": 1}}


@PRIORS.register("features")
class FeaturePrior(BankPrior):
    """Features of a frozen backbone (``backbone: {name: ...}``, see backbones.BACKBONES)."""

    def __init__(self, latent_shape: Sequence[int], backbone: dict[str, Any] | None = None,
                 n_images: int = 8192, stage1: dict[str, Any] | None = None,
                 classes: Sequence[int] | None = None, seed: int = 0, label: str | None = None,
                 precision: str = "fp32") -> None:
        super().__init__(latent_shape, classes)
        if not backbone or "name" not in backbone:
            raise ValueError("features prior needs backbone: {name: ...}; known backbones: "
                             + ", ".join(__import__("backbones").BACKBONES.names()))
        self.name = label or f"features[{backbone['name']}]"
        self.backbone_cfg = dict(backbone)
        self.n_images, self.seed = int(n_images), int(seed)
        self.stage1 = {**STAGE1_DEFAULTS, **(stage1 or {})}
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"features prior precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision

    @classmethod
    def upstream(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """What the backbone needs first (the offline MAE: its training stage)."""
        from backbones import backbone_upstream
        return backbone_upstream(cfg, cfg["prior"].get("backbone"))

    @classmethod
    def validate(cls, cfg: dict[str, Any]) -> None:
        """Missing backbone weights fail before any stage runs (with the download command)."""
        from backbones import BACKBONES, preflight_backbone
        bb = cfg["prior"].get("backbone")
        if not isinstance(bb, dict) or "name" not in bb:
            raise ValueError("prior.backbone: a feature prior needs backbone: {name: ...}; known backbones: "
                             + ", ".join(BACKBONES.names()))
        preflight_backbone(bb, "prior.backbone")

    def build_backbone(self, ctx: FitContext):
        from backbones import backbone_overrides, build_backbone
        self.overrides = backbone_overrides(self.backbone_cfg, ctx.inputs)
        return build_backbone(self.backbone_cfg, **self.overrides)

    # ---- the stage-1 model as the DM stage's starting point (tokenizer.design: stage1)

    def stage1_architecture(self, image_size: int) -> dict[str, Any]:
        """The tokenizer section (encoder, decoder, widths) that rebuilds the stage-1 model:
        the backbone (weights as stage 1 loaded them) pooled to the latent grid, then the MLP."""
        if getattr(self, "stage1_model", None) is None:
            raise RuntimeError(f"{self.name}: no stage-1 model (reference stage of an older version?)")
        m = self.stage1_model
        return self.stage1_tokenizer({**self.backbone_cfg, **m["backbone_overrides"]}, self.stage1["decoder"],
                                     self.latent_shape, m["hidden"])

    @staticmethod
    def stage1_tokenizer(backbone: dict[str, Any], decoder: dict[str, Any], latent_shape: Sequence[int],
                         hidden: int) -> dict[str, Any]:
        """The tokenizer section of a stage-1 model: ``backbone`` pooled to the latent grid, the
        MLP (``hidden`` wide; 0 = twice the feature width, as the tokenizer reads it), ``decoder``.
        Also what benchmark/plan.py counts before any reference stage has run."""
        return {"encoder": {"name": "backbone", "backbone": backbone, "latent_grid": latent_shape[1],
                            "norm_eval": True},
                "decoder": dict(decoder), "latent_channels": latent_shape[0], "bottleneck_hidden": hidden}

    def stage1_weights(self) -> dict[str, torch.Tensor]:
        """Bottleneck and decoder weights of a Tokenizer built from ``stage1_architecture``.
        Stage 1 standardised the pooled features per channel, (f - m) / s, before the MLP; that
        affine map is folded into the MLP's first 1x1 conv (W / s, b - W m / s), which is exact."""
        m = self.stage1_model
        w, b = m["proj"]["0.weight"], m["proj"]["0.bias"]
        s, mu = m["feature_std"], m["feature_mean"]
        out = {f"bottleneck.{k}": v.clone() for k, v in m["proj"].items()}
        out["bottleneck.0.weight"] = w / s.view(1, -1, 1, 1)
        out["bottleneck.0.bias"] = b - w[:, :, 0, 0] @ (mu / s)
        out.update({f"decoder.{k}": v.clone() for k, v in m["decoder"].items()})
        out.update({f"encoder.bb.{k}": v.clone() for k, v in m.get("backbone", {}).items()})
        return out

    def stage1_norm(self):
        """The bank's normalisation: matching compares (z - mean) / scale with the bank."""
        from tokenizers import LatentNorm
        return LatentNorm(float(self.stage1_model["latent_mean"]), float(self.stage1_model["latent_scale"]))

    def fit(self, ctx: FitContext) -> None:
        """Stage 1 on ``ctx.dist``'s device, data parallel over its ranks (see ``extract_features``
        and ``_train_stage1``); every rank ends with the same bank and stage-1 model. With one
        process (``ctx.dist`` None or a world of 1) no collective runs and the computation is the
        one of the stage before it was data parallel."""
        from benchmark.data import subset
        from benchmark.distributed import DistInfo
        info = ctx.dist or DistInfo()
        device = info.device
        h = self.latent_shape[1]
        t0 = time.perf_counter()
        backbone = self.build_backbone(ctx).to(device)
        images = subset(ctx.dataset, self.n_images, seed=self.seed)
        feats = extract_features(backbone, images, h, precision=self.precision, info=info)
        t_feat = time.perf_counter() - t0
        log.info("%s: %d feature grids %s in %.1f s (%s weights) on %s", self.name, len(feats),
                 tuple(feats.shape[1:]), t_feat, backbone.weights_source, device)
        weights_source = backbone.weights_source
        # Random weights cannot be reloaded: keep them (below), else only the features are needed.
        random_weights = ({k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
                          if weights_source == "random" else None)
        del backbone
        # Per-channel standardisation of the raw features keeps the MLP's inputs O(1) whatever
        # the backbone's feature scale (ViT tokens after LayerNorm vs ReLU6 CNN maps).
        f_mean = feats.mean(dim=(0, 2, 3), keepdim=True)
        f_std = feats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        feats = (feats - f_mean) / f_std
        proj, dec, rec = self._train_stage1(feats, images, ctx, info)
        with torch.no_grad():
            z = torch.cat([proj(feats[i:i + 1024]) for i in range(0, len(feats), 1024)])
            mse = float(torch.cat([F.mse_loss((dec(z[i:i + 256]) + 1) * 0.5,
                                              images.float_batch(torch.arange(i, min(len(z), i + 256))).to(device),
                                              reduction="none").flatten(1).mean(1)
                                   for i in range(0, len(z), 256)]).mean())
        mean, scale = float(z.mean()), float(z.std())
        self._set_bank(((z - mean) / scale).cpu(), images.labels)
        overrides = {k: str(v) for k, v in self.overrides.items()}
        self.stage1_model = {
            "proj": {k: v.detach().cpu().clone() for k, v in proj.state_dict().items()},
            "decoder": {k: v.detach().cpu().clone() for k, v in dec.state_dict().items()},
            "feature_mean": f_mean.flatten().cpu().clone(), "feature_std": f_std.flatten().cpu().clone(),
            "latent_mean": mean, "latent_scale": scale, "hidden": int(proj[0].out_channels),
            "feature_dim": int(feats.shape[1]), "backbone_overrides": overrides}
        if random_weights is not None:
            # Nothing to reload random weights from: keep them, or a tokenizer rebuilt from this
            # stage-1 model would start from other features than the bank's.
            self.stage1_model["backbone"] = random_weights
        self.info = {"backbone": self.backbone_cfg["name"], "backbone_weights": weights_source,
                     "backbone_dim": int(feats.shape[1]), "stage1_iters": int(self.stage1["iters"]),
                     "stage1_final_loss": rec,
                     "stage1_train_psnr": -10 * math.log10(max(mse, 1e-12)),
                     "reference_latent_mean": mean, "reference_latent_scale": scale,
                     "reference_bank_size": int(len(self.bank)), "feature_seconds": t_feat,
                     "stage1_seconds": time.perf_counter() - t0 - t_feat, "reference_precision": self.precision}

    def _train_stage1(self, feats: torch.Tensor, images, ctx: FitContext,
                      info=None) -> tuple[nn.Module, nn.Module, float]:
        """Train the bottleneck MLP and the decoder on the standardised ``feats``; returns them and
        the last loss. Checkpoints every ``stage1.checkpoint_every`` steps in ``ctx.out_dir``
        (model, optimiser, data and torch RNG, step), so a killed reference stage resumes exactly.
        The features are recomputed on resume rather than cached: extraction is deterministic
        (frozen backbone in eval mode, seeded image subset, fixed batches whatever the number of
        ranks), a cache would be ~130 MB per reference at 4,096 images, and the checkpoint keeps
        their SHA-256, so a resume on features that differ (another thread count, device or
        machine) starts over instead of mixing.

        Data parallel as the teacher stage (``info``, a benchmark.distributed.DistInfo, with a
        world of N > 1): ``stage1.batch_size`` stays the global batch; every rank draws the whole
        batch's indices from the shared generator, as one process does, and computes the loss of
        its slice (rank r: rows r*B/N onwards); DistributedDataParallel averages the gradients,
        so every rank takes the same step, the one of one process up to the order of float sums.
        Rank 0 alone writes the checkpoints, every rank reads them on resume."""
        from torch.nn.parallel import DistributedDataParallel
        from benchmark.accel import adamw
        from benchmark.distributed import DistInfo
        from benchmark.training import Checkpoint, train_steps
        from tokenizers import bottleneck_mlp, build_decoder
        info = info or DistInfo()
        device = info.device
        s1, c, d = self.stage1, self.latent_shape[0], feats.shape[1]
        bs = int(s1["batch_size"])
        if bs % info.world_size:
            raise ValueError(f"prior.stage1.batch_size={bs} is the global batch and must divide evenly over "
                             f"{info.world_size} processes; use a multiple of {info.world_size}")
        hidden = int(s1["hidden"]) or 2 * d
        g = torch.Generator().manual_seed(self.seed + 11)
        torch.manual_seed(self.seed + 11)
        proj = bottleneck_mlp(d, hidden, c)
        dec = build_decoder(s1["decoder"], c, images.channels)
        # One module for the loop; same parameter order as before. Built on the CPU from the
        # seeded RNG, then moved: every device and every rank starts from the same weights.
        model = nn.Sequential(proj, dec).to(device)
        if s1.get("compile"):
            from benchmark.accel import compile_in_place
            compile_in_place(proj); compile_in_place(dec)
        opt = adamw(model.parameters(), device, lr=float(s1["lr"]), betas=(0.9, 0.95), weight_decay=0.005)
        net = model
        if info.distributed:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        per_rank = bs // info.world_size
        mine = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        # No run directory (a prior fitted outside the grid): nothing to resume, no checkpoint.
        ckpt = Checkpoint(None if ctx.out_dir is None else Path(ctx.out_dir) / "stage1_ckpt.pt",
                          int(s1["checkpoint_every"]))

        def loss_at(step: int) -> torch.Tensor:
            # The whole global batch is drawn on every rank (the generator's stream stays the one
            # process's), then this rank's slice is loaded and computed.
            idx = torch.randint(len(images), (bs,), generator=g)[mine]
            x = images.float_batch(idx).to(device)
            # bf16 autocast (when asked) for the decoder's convs, ~2x faster on this CPU.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                x_rec = (net(feats[idx.to(feats.device)]).float() + 1.0) * 0.5
            return (x_rec - x).abs().mean() + F.mse_loss(x_rec, x)

        _, recent, _ = train_steps(f"reference/{self.name} stage 1", model, opt, None, g, ckpt,
                                   int(s1["iters"]), loss_at, window=1,
                                   extra_state={"features_sha256": _sha256(feats)}, info=info)
        if info.is_main:
            ckpt.remove()
        return proj, dec, recent[-1] if recent else float("nan")


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
