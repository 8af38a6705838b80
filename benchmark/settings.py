"""Typed settings of the runner's own config sections: ``tokenizer``, ``generator``, ``eval``,
``dataset``.

The stage modules read these sections through the frozen dataclasses below instead of casting
dict values on every read (``int(tc["batch_size"])``). ``Settings.from_dict(section, where)``
refuses unknown keys (with the config path, a close match and the known keys) and checks and
coerces every value's type, so a bad config is refused before any stage runs
(benchmark/config.py's ``validate`` calls it for every cell).

Defaults live here, in one place, and are exactly the ones the stage code used when a key was
absent (``tc.get("precision", "fp32")``); a key the code always required has no default, so a
config without it is refused by name. Where the YAML preset sets another value than the default
(``tokenizer.precision``: bf16 in every preset, fp32 when absent), the field's comment says so.
Plug-in sections (``tokenizer.encoder``, ``tokenizer.decoder``, ``tokenizer.gan``,
``generator.model_args``) stay plain dicts: their plug-ins check their own keys
(benchmark/plugin_keys.py).

Coercion rules: an int field takes an int, a float with an integral value, or a string that
parses as an int; a float field takes an int, a float or a string that parses as a float; a
bool field takes only a bool; a str field only a str; a tuple field a list or tuple (of the
declared length, when fixed); ``Optional[X]`` also takes None; ``Literal[...]`` one of its values.

This module is the bottom layer: standard library only, no runner import.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar, Union

Precision = Literal["fp32", "bf16"]

S = TypeVar("S", bound="Settings")


class SettingsError(ValueError):
    """A runner config section holds an unknown key, lacks a required one, or has a value of the
    wrong type. The message names the config path (``tokenizer.batch_size``)."""


class Settings:
    """Base of the typed sections: ``from_dict`` and ``to_dict``."""

    @classmethod
    def from_dict(cls: type[S], d: Any, where: str) -> S:
        """The section ``d`` (a plain dict, e.g. ``cfg["tokenizer"]``) at config path ``where``,
        checked and coerced; raises SettingsError (a ValueError) naming the path."""
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise SettingsError(f"`{where}` must be a mapping of keys to values, got {_show(d)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in d:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {where}.{close[0]}?)" if close else ""
                raise SettingsError(f"unknown key {where}.{key}{hint}; known keys of `{where}`: "
                                    f"{', '.join(sorted(fields))}")
        missing = [name for name, f in fields.items() if name not in d and _required(f)]
        if missing:
            raise SettingsError(f"`{where}` lacks {', '.join(f'`{where}.{k}`' for k in missing)} "
                                f"(no default: every preset sets it)")
        values = {name: _coerce(d[name], hints[name], f"{where}.{name}") for name in fields if name in d}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The sections. Field comments give the source of a number where the YAML presets name one.


@dataclass(frozen=True, kw_only=True)
class SamplerSettings(Settings):
    """``eval.sampler``: how gen_eval integrates the generator's flow."""
    # generators.sampling.METHODS; the paper samples with the SDE, Euler-Maruyama 250 steps
    # (DMVAE_METHOD.md), which eval=paper sets
    method: Literal["euler", "heun", "euler_maruyama"]
    steps: int                       # integration steps (cpu-tiny: 32; paper: 250)
    cfg_scale: float                 # 1 = no classifier-free guidance
    time_shift: float                # 1 = no shift of the time grid
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # guidance only for t in [t0, t1]; default: always


@dataclass(frozen=True, kw_only=True)
class TokenizerSettings(Settings):
    """``tokenizer`` (benchmark/conf/tokenizer/*.yaml): the tokenizer stage's schedule and losses.
    The numbers of cpu-tiny/cpu-small are our choices for a CPU budget; paper-in256's sources are
    in its YAML comments (DMVAE_METHOD.md: lr 2e-5, 350K DM steps, bf16, L1 + LPIPS + PatchGAN)."""
    # documentation only
    preset: str
    reproduces: Optional[str] = None
    description: Optional[str] = None
    # The tokenizer column of the tables when a grid varies a setting of one preset (grid=dm-length:
    # the DM phase's length), so those cells are rows of their own, not seeds of one row.
    label: Optional[str] = None
    # plug-in sections, built by tokenizers.build_tokenizer / PatchGAN from the raw dicts
    encoder: dict
    decoder: dict
    gan: Optional[dict] = None       # PatchGAN kwargs; None or weight 0 = no discriminator
    latent_channels: int
    bottleneck_hidden: int = 0       # 0 = twice the encoder width (tokenizers.build_tokenizer's default)
    # optimisation
    batch_size: int                  # the global batch (divided over data-parallel ranks)
    lr: float                        # paper-in256: 2e-5 (DMVAE_METHOD.md)
    betas: tuple[float, float]
    weight_decay: float
    lr_warmup_steps: int
    grad_clip: float
    # reconstruction loss
    l1_weight: float
    l2_weight: float = 0.0           # absent = no L2 term (cpu-tiny/cpu-small set 1.0)
    perceptual: Optional[str] = None  # mobilenet_v2 | lpips-vgg; needed only when perceptual_weight > 0
    perceptual_weight: float = 0.0   # 0 = no perceptual network is built
    # schedule (one iteration counter over the three phases)
    warmup_iters: int                # reconstruction only
    warmup_frozen_encoder: bool = False  # true: warm-up trains only bottleneck + decoder (DMVAE stage 1)
    # stage1 (paper): a prior with a stage-1 model (feature priors) gives the tokenizer: its
    # backbone + MLP as the encoder, its decoder, all unfrozen, and no warm-up (stage 1 was it);
    # other priors use the preset's encoder. preset: the preset's encoder for every prior.
    design: Literal["stage1", "preset"] = "stage1"
    match_iters: int                 # reconstruction + lambda * matching; paper-in256: 350K (DMVAE_METHOD.md)
    finetune_iters: int              # decoder only, encoder frozen (paper stage 4)
    norm_images: int                 # images used to fit the latent mean/scale
    stats_every: int = 0             # latent std and SWD to p_ref of a fixed batch every N iterations (0 = off)
    match_lr: Optional[float] = None  # learning rate of the DM (match) and fine-tune phases; None = lr
    checkpoint_every: int
    # execution
    precision: Precision = "fp32"    # absent = fp32; every preset sets bf16 (the paper's autocast)
    compile: bool = False            # torch.compile the encoder and decoder

    def matching_optim(self) -> dict[str, Any]:
        """The optimiser recipe of the DM phase, which a matching loss with networks of its own
        (dm's fake) follows: the paper trains VAE and fake with one recipe."""
        return {"lr": self.match_lr or self.lr, "warmup_steps": self.lr_warmup_steps, "grad_clip": self.grad_clip}


GENERATOR_SIZE_KEYS = ("steps", "batch_size", "train_images")


def generator_epochs(gen: dict[str, Any]) -> float:
    """Epochs a generator section trains: steps x batch_size / train_images. One formula for the
    config (benchmark/config.py sets ``generator.epochs`` from it) and for figures reading stored
    cell configs; raises KeyError, TypeError or ZeroDivisionError where a section lacks them."""
    return float(gen["steps"]) * float(gen["batch_size"]) / float(gen["train_images"])


@dataclass(frozen=True, kw_only=True)
class GeneratorSettings(Settings):
    """``generator`` (benchmark/conf/generator/*.yaml): the latent flow-matching DiT. paper-in256
    is LightningDiT-XL/1 with AdamW lr 2e-4, betas (0.9, 0.95), EMA 0.9999, label dropout 0.1,
    batch 1024, 64 epochs (DMVAE_METHOD.md, Table 3); cpu-* numbers are our choices."""
    # documentation only
    preset: str
    reproduces: Optional[str] = None
    description: Optional[str] = None
    epochs: Optional[float] = None   # derived by benchmark/config.py: steps * batch_size / train_images
    # model
    model: str                       # generators.GENERATORS size name (Tiny, S, ..., XL)
    model_args: dict = field(default_factory=dict)  # generator kwargs (patch_size, ...), a plug-in section
    label_dropout: float             # paper: 0.1; model_args.class_dropout_prob overrides it
    # data and optimisation
    train_images: int                # latents encoded once (stage latent_cache); paper: 1,281,167
    batch_size: int                  # the global batch; paper: 1024
    steps: int                       # paper: 80073 = 64 epochs
    lr: float                        # paper: 2e-4
    betas: tuple[float, float]       # paper: (0.9, 0.95)
    weight_decay: float
    lr_warmup_steps: int
    grad_clip: float
    ema_decay: float                 # paper: 0.9999
    t_sampling: str                  # generators.sample_t kind; paper: uniform
    checkpoint_every: int
    # EMA weights kept at these fractions of training (ema_025.pt, ...; gen_eval scores them):
    # the paper's gFID-vs-epochs view, and a check that a ranking is not an artefact of one length.
    snapshots: tuple[float, ...] = ()
    # Images per shard file of the latent cache (benchmark/stages/latent_cache.py): one unit of
    # work of a rank and of resume after a kill. A multiple of encode_all's batch (500) keeps the
    # cached latents bit-identical to encoding the whole set at once.
    cache_shard_size: int = 10000
    # Scale (issue #15; PAPER_SCALE.md). The defaults are the behaviour before these keys existed,
    # and benchmark/dag.py keeps a key out of the generator's stage key while it has its default
    # value, so existing run directories keep their names.
    # precision: bf16 = torch.autocast(bfloat16) around the DiT's forward on the device type; the
    # weights, AdamW state, EMA and the loss stay fp32 (DMVAE_METHOD.md: bf16 autocast in the
    # DM stages; paper-in256 uses it for the generator too).
    precision: Precision = "fp32"
    # grad_accum: each rank computes its share of the global batch in this many micro-batches
    # (summed gradients, one optimiser step). The draw of the global batch is unchanged, so results
    # equal grad_accum=1 up to the order of float sums (tests/test_generator_scale.py). How, not
    # what: not part of the stage key (like the world size).
    grad_accum: int = 1
    # activation_checkpointing: recompute each DiT block's activations in the backward pass
    # (torch.utils.checkpoint, non-reentrant) instead of storing them; same gradients, less memory,
    # about one more forward of compute. How, not what: not part of the stage key.
    activation_checkpointing: bool = False
    # compile: torch.compile the DiT in place (nn.Module.compile: state_dict keys unchanged). Same
    # computation with fused kernels, so results equal eager up to float rounding: how, not what,
    # and not part of any stage key (benchmark/dag.py HOW_KEYS).
    compile: bool = False

    def __post_init__(self) -> None:
        # Types are checked by from_dict; ranges here, so a bad value fails before any stage runs.
        if self.grad_accum < 1:
            raise SettingsError(f"generator.grad_accum={self.grad_accum} (needs >= 1: micro-batches per rank)")
        if self.batch_size % self.grad_accum:
            raise SettingsError(f"generator.batch_size={self.batch_size} must divide into generator.grad_accum="
                                f"{self.grad_accum} micro-batches; use a multiple of {self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class DomainSettings(Settings):
    """``eval.domain``: the domain detector, a small CNN classifier trained on the dataset's own
    training split (benchmark/stages/domain_detector.py). Its penultimate features give FD, KID
    and precision/recall beside Inception's (columns ``*_domain``). Absent = off. The training
    keys (width ... seed) form the ``domain_detector`` stage's key, shared by every cell of a
    dataset; the counts enter the keys of the eval stages that use them."""
    enabled: bool = False
    n_samples: int = 10000           # generated samples it scores (the first eval.n_samples also feed Inception)
    n_ref: int = 10000               # test-split images: reference features and rFD's reconstructions
    snapshot_n_samples: int = 2000   # samples per generator EMA snapshot (same labels and noise for each)
    kid_subset_size: int = 1000      # torch-fidelity's default
    # training of the classifier
    width: int = 32                  # conv widths w, 2w, 4w
    feature_dim: int = 128           # the penultimate layer: the features every domain metric uses
    steps: int = 2500                # 5.3 epochs of Fashion-MNIST's 60,000 training images
    batch_size: int = 128
    lr: float = 0.1                  # SGD with Nesterov momentum 0.9, linear warm-up then linear decay to 0
    weight_decay: float = 5e-4
    warmup_steps: int = 50
    shift: int = 2                   # random translation by up to +-shift px (crops of side resolution - 2 * shift)
    flip: bool = False               # random horizontal flips (cost 0.2-0.3% accuracy at 5 epochs)
    precision: Precision = "bf16"    # training autocast: 1,240 vs 550 img/s in fp32 (1 thread, reference CPU)
    seed: int = 0
    checkpoint_every: int = 200      # how often, not what: not part of any key
    compile: bool = False            # torch.compile the classifier in place: how, not what (in no key)

    def __post_init__(self) -> None:
        # Types are checked by from_dict; ranges here, so a bad value fails before any stage runs.
        bad = [f"{k}={getattr(self, k)} (needs >= 2)" for k in
               ("n_samples", "n_ref", "snapshot_n_samples", "kid_subset_size", "batch_size") if getattr(self, k) < 2]
        bad += [f"{k}={getattr(self, k)} (needs >= 1)" for k in
                ("width", "feature_dim", "steps", "checkpoint_every") if getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)} (needs >= 0)" for k in ("shift", "warmup_steps") if getattr(self, k) < 0]
        bad += [] if self.lr > 0 else [f"lr={self.lr} (needs > 0)"]
        if bad:
            raise SettingsError(f"eval.domain: {', '.join(bad)}")


@dataclass(frozen=True, kw_only=True)
class EvalSettings(Settings):
    """``eval`` (benchmark/conf/eval/cpu-tiny.yaml): FID reference, samples, detectors."""
    preset: Optional[str] = None     # documentation only
    reproduces: Optional[str] = None
    description: Optional[str] = None
    n_ref: int                       # held-out (test split) images for reference statistics and rFID
    n_samples: int                   # generated images, class-balanced
    detector: str                    # benchmark.metrics.DETECTORS name
    extra_detectors: tuple[str, ...] = ()  # FD with other detectors, reported as fd_<name>
    precision: Precision             # detector precision, both sides
    batch_size: int
    kid_subset_size: int             # torch-fidelity's default is 1000; must not exceed either set
    sampler: SamplerSettings
    labels: Optional[Literal["balanced", "random"]] = None  # None = balanced (n / K per class)
    ref_npz: Optional[str] = None    # ADM-style reference statistics -> extra column gfid_ref_npz
    bootstrap: int = 0               # bootstrap replicates for 95% intervals of every FD (<fd>_lo, <fd>_hi); 0 = none
    # gen_eval draws its samples in shards of this many, each from its own generator seeded by
    # (cell seed, shard index), and rank r of W takes shards r, r + W, ...: the samples depend on
    # shard_size (it is also the sampler's batch) but not on the number of ranks or batch_size.
    shard_size: int = 250
    save_npz: bool = False           # also write samples.npz (arr_0 uint8 NHWC RGB, ADM evaluator's format)
    compile: bool = False            # torch.compile the sampling DiT in gen_eval (not in any stage key)
    domain: DomainSettings = field(default_factory=DomainSettings)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1:
            raise SettingsError(f"eval.shard_size={self.shard_size} and eval.batch_size={self.batch_size} "
                                f"must be >= 1")
        if self.ref_npz is not None:
            _check_ref_npz(self.ref_npz)

    @property
    def label_mode(self) -> str:
        return self.labels or "balanced"


def _check_ref_npz(path: str) -> None:
    """``eval.ref_npz`` must be an .npz holding ``mu`` and ``sigma`` (ADM's reference batches,
    e.g. VIRTUAL_imagenet256_labeled.npz, do): checked when the config is, so a wrong path fails
    before any stage runs rather than after 50K samples. An .npz is a zip of ``<name>.npy``
    members, so the standard library can list them without reading the arrays."""
    import zipfile
    from pathlib import Path
    p = Path(path).expanduser()
    if not p.is_file():
        raise SettingsError(f"eval.ref_npz: no file at {p} (ADM-style reference statistics with 'mu' and "
                            f"'sigma', e.g. VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion)")
    try:
        with zipfile.ZipFile(p) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except zipfile.BadZipFile as exc:
        raise SettingsError(f"eval.ref_npz: {p} is not an .npz archive ({exc})") from exc
    missing = [k for k in ("mu", "sigma") if k not in names]
    if missing:
        raise SettingsError(f"eval.ref_npz: {p} has no {', '.join(missing)} array; it holds "
                            f"{', '.join(sorted(names)) or 'nothing'} (expected ADM reference statistics)")


@dataclass(frozen=True, kw_only=True)
class DatasetSettings(Settings):
    """``dataset`` (benchmark/conf/dataset/*.yaml)."""
    preset: Optional[str] = None     # documentation only
    reproduces: Optional[str] = None
    description: Optional[str] = None
    name: str                        # benchmark.datasets.DATASETS name (fashion_mnist, mnist, imagenet, folder)
    resolution: int                  # images are zero-padded/resized to this side
    channels: int
    num_classes: int
    root: Optional[str] = None       # a folder with the files; None = search the usual places (digits only)
    # Random horizontal flip of training batches (PAPER_SCALE.md: ADM/DiT training flips; evaluation
    # does not). The imagenet and folder presets set true; absent = false (the digit sets).
    hflip: bool = False
    on_bad_image: Literal["skip", "fail"] = "skip"  # undecodable files: skipped and counted, or an error
    workers: int = 4                 # DataLoader decode processes per rank (file-backed sets; 0 = in-process)
    jpeg_draft: bool = False         # libjpeg DCT-scaled decode: faster, not bit-identical to the ADM crop

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.channels < 1 or self.workers < 0:
            raise SettingsError(f"dataset: resolution={self.resolution}, channels={self.channels} (need >= 1), "
                                f"workers={self.workers} (needs >= 0)")


SECTIONS: dict[str, type[Settings]] = {"tokenizer": TokenizerSettings, "generator": GeneratorSettings,
                                       "eval": EvalSettings, "dataset": DatasetSettings}


def check_sections(cfg: dict[str, Any]) -> None:
    """Check every runner section of a resolved cell config (raises SettingsError)."""
    for name, cls in SECTIONS.items():
        cls.from_dict(cfg[name], name)


# ---------------------------------------------------------------------------------------------
# Type checks and coercion


def _show(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict or tp is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, Settings):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> SettingsError:
        return SettingsError(f"`{where}` must be {_type_name(tp)}, got {_show(value)}")

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(value, a, where)
            except SettingsError as exc:
                errors.append(exc)
        if len(options) == 1:
            raise SettingsError(f"{errors[0]} (or None)")
        raise bad()
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise SettingsError(f"`{where}` must be one of {', '.join(str(a) for a in args)}, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SettingsError(f"`{where}` must be {_type_name(tp)}, got {len(value)} values: {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad()
    if isinstance(tp, type) and issubclass(tp, Settings):
        return tp.from_dict(value, where)
    raise TypeError(f"{where}: settings type {tp!r} is not supported")  # a bug in this module
