"""Check every plug-in section of a resolved cell config against what its plug-in accepts.

``check_cell_keys(cfg)`` walks the sections the runner turns into plug-ins (prior, loss,
tokenizer encoder/decoder, generator) and hands each to :func:`benchmark.typed.check_keys` with
the arguments the runner passes itself, so ``+prior.compnent_std=0.3`` fails before any stage
runs. Each ``runner_args`` tuple below mirrors one builder; keep them in step:
``benchmark/stages/common.py:build_prior``, ``benchmark/stages/tokenizer.py:build_matching_loss``,
``tokenizers/models.py:build_tokenizer``/``build_decoder``, ``backbones/base.py:build_backbone``,
``benchmark/stages/generator.py:build_model`` and ``build_score_net``.

A factory that still takes ``**kwargs`` cannot be checked: it is skipped with one warning that
asks its author to list its keys (third-party plug-ins written before this check keep working;
tests/test_plugin_keys.py requires it of every built-in).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from benchmark.typed import ConfigError, check_keys, check_known_keys, takes_var_keywords

log = logging.getLogger(__name__)

# What each builder passes besides the section's own keys.
PRIOR_ARGS = ("latent_shape",)
LOSS_ARGS = ("latent_shape", "num_classes", "prior", "teacher", "teacher_kind")
ENCODER_ARGS = ("in_channels", "image_size")
DECODER_ARGS = ("latent_channels", "out_channels")
GENERATOR_ARGS = ("input_size", "in_channels", "num_classes")
GAN_ARGS = ("in_channels",)
MAE_ARGS = ("img_size",)  # the offline MAE's image size is the backbone section's img_size
NAMED = ("name",)         # a registry section's `name` picks the entry; the builder pops it

_warned: set[str] = set()


def check_cell_keys(cfg: dict[str, Any]) -> None:
    """Raise benchmark.typed.ConfigError naming the first unknown key of any plug-in section."""
    check_prior(cfg["prior"], "prior")
    check_loss(cfg["loss"], "loss")
    tok = cfg["tokenizer"]
    check_encoder(tok["encoder"], "tokenizer.encoder")
    check_decoder(tok["decoder"], "tokenizer.decoder")
    if isinstance(tok.get("gan"), dict):
        from tokenizers.losses import PatchGAN
        _check("gan", "patchgan", PatchGAN, tok["gan"], "tokenizer.gan", GAN_ARGS)
    gen = cfg["generator"]
    _check_generator(gen["model"], gen.get("model_args") or {}, "generator.model_args")


def _check(kind: str, name: str, factory: Callable[..., Any], section: dict[str, Any], where: str,
           runner_args: tuple[str, ...] = (), extra_keys: tuple[str, ...] = ()) -> None:
    if takes_var_keywords(factory):
        if where not in _warned:  # once per section per process, not once per cell
            _warned.add(where)
            log.warning("%s %r takes **kwargs: the keys under `%s` cannot be checked; its author "
                        "should list them as keyword parameters (benchmark/typed.py)", kind, name, where)
        return
    check_keys(kind, name, factory, section, where, runner_args, extra_keys)


def _name(section: dict[str, Any], where: str, registry: Any) -> str:
    """The registry entry a section names; a section without one would fail with a bare KeyError
    in its builder (e.g. after `++` replaced an interpolated section whole)."""
    if "name" not in section:
        raise ConfigError(f"`{where}.name` is missing: `{where}` must name a {registry.kind} "
                          f"({', '.join(registry.names())})")
    return section["name"]


def check_prior(section: dict[str, Any], where: str) -> None:
    from priors import PRIORS
    name = _name(section, where, PRIORS)
    _check("prior", name, PRIORS.get(name), section, where, PRIOR_ARGS, NAMED)
    _nested_prior_sections(section, where)


def _nested_prior_sections(section: dict[str, Any], where: str) -> None:
    """The sections a prior hands on to other plug-ins (by key, whichever prior it is)."""
    if isinstance(section.get("backbone"), dict):
        check_backbone(section["backbone"], f"{where}.backbone")
    if isinstance(section.get("text_encoder"), dict):
        from backbones.text import TEXT_ENCODERS
        te = section["text_encoder"]
        name = _name(te, f"{where}.text_encoder", TEXT_ENCODERS)
        _check("text_encoder", name, TEXT_ENCODERS.get(name), te, f"{where}.text_encoder",
               extra_keys=NAMED)
    if isinstance(section.get("stage1"), dict):
        check_stage1(section["stage1"], f"{where}.stage1")
    if isinstance(section.get("base"), dict) and section["name"] == "subset":
        check_subset_base(section["base"], f"{where}.base")
    if isinstance(section.get("base_prior"), dict):   # difftraj's plain tokenizer cell
        check_prior(section["base_prior"], f"{where}.base_prior")
    if isinstance(section.get("base_loss"), dict):
        check_loss(section["base_loss"], f"{where}.base_loss")


def check_subset_base(section: dict[str, Any], where: str) -> None:
    from priors import PRIORS
    name = _name(section, where, PRIORS)
    # The subset prior drops the base's own label and classes and passes its own.
    _check("prior", name, PRIORS.get(name), section, where, PRIOR_ARGS, (*NAMED, "label", "classes"))
    _nested_prior_sections(section, where)


def check_stage1(section: dict[str, Any], where: str) -> None:
    from priors.features import STAGE1_DEFAULTS
    check_known_keys("frozen-backbone stage", "stage1", section, where, set(STAGE1_DEFAULTS))
    if isinstance(section.get("decoder"), dict):
        check_decoder(section["decoder"], f"{where}.decoder")


def check_backbone(section: dict[str, Any], where: str) -> None:
    from backbones import BACKBONES
    name = _name(section, where, BACKBONES)
    _check("backbone", name, BACKBONES.get(name), section, where, extra_keys=NAMED)
    if name == "offline-mae":
        _check_offline_mae(section, where)


def _check_offline_mae(section: dict[str, Any], where: str) -> None:
    """Its `arch` builds the MAE, its `train` drives the ssl_backbone stage: both are read
    with defaults merged in, where a misspelled key would otherwise vanish."""
    if isinstance(section.get("arch"), dict):
        from backbones.offline_mae import MAE
        _check("offline-mae architecture", "MAE", MAE, section["arch"], f"{where}.arch", MAE_ARGS)
    if isinstance(section.get("train"), dict):
        from benchmark.stages.ssl_backbone import TRAIN_DEFAULTS
        check_known_keys("ssl_backbone stage", "train", section["train"], f"{where}.train", set(TRAIN_DEFAULTS))


def check_loss(section: dict[str, Any], where: str) -> None:
    from priors import LOSSES
    name = _name(section, where, LOSSES)
    # `lambda` is the config's name of the constructors' `weight` (a Python keyword can't be one).
    if "weight" in section:
        raise ConfigError(f"`{where}.weight` is now `{where}.lambda` (one name in configs, records and tables)")
    # The constructor's `weight` comes from `lambda`: the former is the runner's, the latter the config's.
    _check("loss", name, LOSSES.get(name), section, where, LOSS_ARGS + ("weight",), NAMED + ("lambda",))
    if isinstance(section.get("score_net_args"), dict) and section.get("score_net"):
        _check_generator(section["score_net"], section["score_net_args"], f"{where}.score_net_args")


def check_encoder(section: dict[str, Any], where: str) -> None:
    from tokenizers import ENCODERS
    name = _name(section, where, ENCODERS)
    _check("encoder", name, ENCODERS.get(name), section, where, ENCODER_ARGS, NAMED)
    if isinstance(section.get("backbone"), dict):
        check_backbone(section["backbone"], f"{where}.backbone")


def check_decoder(section: dict[str, Any], where: str) -> None:
    from tokenizers import DECODERS
    name = _name(section, where, DECODERS)
    _check("decoder", name, DECODERS.get(name), section, where, DECODER_ARGS, NAMED)


def _check_generator(name: str, model_args: dict[str, Any], where: str) -> None:
    from generators import GENERATORS
    if name not in GENERATORS:
        return  # config.validate names unknown generators with the known ones
    _check("generator", name, GENERATORS[name], model_args, where, GENERATOR_ARGS)
