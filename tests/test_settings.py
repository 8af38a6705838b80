"""benchmark/settings.py: typed settings of the runner's sections (tokenizer, generator, eval,
dataset): unknown keys and wrong types are refused by config path, every preset composes into
settings, and the defaults are the ones the stages used when a key was absent."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmark import config
from benchmark.settings import (SECTIONS, DatasetSettings, EvalSettings, GeneratorSettings, SamplerSettings,
                                SettingsError, TokenizerSettings, check_sections)

CONF = Path(config.__file__).parent / "conf"


def _section(group: str, preset: str | None = None, *overrides: str) -> dict:
    picks = [f"{group}={preset}"] if preset else []
    return OmegaConf.to_container(config._compose([*picks, *overrides]), resolve=True)[group]


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny():
    c = OmegaConf.to_container(config._compose([]), resolve=True)
    return {name: c[name] for name in SECTIONS}


# ---- unknown keys


def test_unknown_key_names_path_close_match_and_known_keys(tiny):
    with pytest.raises(ValueError) as e:
        TokenizerSettings.from_dict({**tiny["tokenizer"], "batch_sise": 64}, "tokenizer")
    msg = str(e.value)
    assert "tokenizer.batch_sise" in msg and "did you mean tokenizer.batch_size?" in msg
    assert "known keys" in msg and "finetune_iters" in msg


def test_unknown_key_in_nested_sampler(tiny):
    ev = tiny["eval"]
    with pytest.raises(SettingsError, match=r"eval\.sampler\.stpes .*did you mean eval\.sampler\.steps"):
        EvalSettings.from_dict({**ev, "sampler": {**ev["sampler"], "stpes": 4}}, "eval")


def test_missing_required_key_is_named(tiny):
    tc = dict(tiny["tokenizer"])
    del tc["lr"]
    with pytest.raises(SettingsError, match=r"`tokenizer\.lr`"):
        TokenizerSettings.from_dict(tc, "tokenizer")


# ---- types


@pytest.mark.parametrize("section,key,value,expected", [
    ("tokenizer", "batch_size", "abc", "int"),
    ("tokenizer", "batch_size", 2.5, "int"),
    ("tokenizer", "batch_size", True, "int"),
    ("tokenizer", "lr", [1], "float"),
    ("tokenizer", "lr", True, "float"),
    ("tokenizer", "compile", 1, "bool"),
    ("tokenizer", "compile", "true", "bool"),
    ("tokenizer", "precision", "fp16", "fp32, bf16"),
    ("tokenizer", "betas", [0.9], "a list of 2"),
    ("tokenizer", "betas", 0.9, "a list of 2"),
    ("tokenizer", "encoder", "conv", "a mapping"),
    ("generator", "model", 3, "str"),
    ("generator", "steps", "many", "int"),
    ("eval", "labels", [0, 1], "balanced, random"),
    ("eval", "extra_detectors", "mobilenet_v2-imagenet", "a list of str"),
    ("eval", "sampler", 32, "a mapping"),
    ("dataset", "resolution", "big", "int"),
    ("dataset", "root", 3, "str"),
])
def test_wrong_type_names_path_and_type(tiny, section, key, value, expected):
    with pytest.raises(ValueError) as e:
        SECTIONS[section].from_dict({**tiny[section], key: value}, section)
    msg = str(e.value)
    assert f"`{section}.{key}`" in msg and expected in msg and repr(value) in msg


def test_wrong_type_in_nested_sampler_and_list_item(tiny):
    ev = tiny["eval"]
    with pytest.raises(SettingsError, match=r"`eval\.sampler\.steps` must be int"):
        EvalSettings.from_dict({**ev, "sampler": {**ev["sampler"], "steps": "x"}}, "eval")
    with pytest.raises(SettingsError, match=r"`eval\.extra_detectors\[1\]` must be str"):
        EvalSettings.from_dict({**ev, "extra_detectors": ["a", 2]}, "eval")


def test_coercion(tiny):
    tc = TokenizerSettings.from_dict({**tiny["tokenizer"], "batch_size": 32.0, "lr": 1, "betas": [1, 0.5],
                                      "warmup_iters": "7"}, "tokenizer")
    assert tc.batch_size == 32 and type(tc.batch_size) is int
    assert tc.lr == 1.0 and type(tc.lr) is float
    assert tc.betas == (1.0, 0.5) and all(type(b) is float for b in tc.betas)
    assert tc.warmup_iters == 7
    ev = EvalSettings.from_dict({**tiny["eval"], "extra_detectors": ["mobilenet_v2-imagenet"]}, "eval")
    assert ev.extra_detectors == ("mobilenet_v2-imagenet",)
    assert isinstance(ev.sampler, SamplerSettings) and ev.sampler.steps == tiny["eval"]["sampler"]["steps"]


def test_settings_are_frozen(tiny):
    tc = TokenizerSettings.from_dict(tiny["tokenizer"], "tokenizer")
    with pytest.raises(dataclasses.FrozenInstanceError):
        tc.batch_size = 1  # type: ignore[misc]


def test_from_dict_is_idempotent(tiny):
    tc = TokenizerSettings.from_dict(tiny["tokenizer"], "tokenizer")
    assert TokenizerSettings.from_dict(tc, "tokenizer") is tc


# ---- optional keys


def test_eval_optional_keys(tiny, tmp_path):
    ev = EvalSettings.from_dict(tiny["eval"], "eval")
    assert ev.labels is None and ev.label_mode == "balanced" and ev.ref_npz is None
    assert ev.sampler.cfg_interval == (0.0, 1.0)
    ev = EvalSettings.from_dict({**tiny["eval"], "labels": None}, "eval")
    assert ev.label_mode == "balanced"
    import numpy as np
    ref = str(tmp_path / "ref.npz")  # ref_npz must exist and hold mu and sigma (checked with the config)
    np.savez(ref, mu=np.zeros(3), sigma=np.eye(3))
    ev = EvalSettings.from_dict({**tiny["eval"], "labels": "random", "ref_npz": ref,
                                 "sampler": {**tiny["eval"]["sampler"], "cfg_interval": [0, 0.5]}}, "eval")
    assert (ev.label_mode, ev.ref_npz, ev.sampler.cfg_interval) == ("random", ref, (0.0, 0.5))


@pytest.mark.parametrize("section,key,value", [
    ("tokenizer", "description", "prose"), ("generator", "reproduces", "prose"), ("generator", "epochs", 3),
    ("eval", "preset", "x"), ("dataset", "description", "prose"),
])
def test_documentation_keys_are_fields(tiny, section, key, value):
    s = SECTIONS[section].from_dict({**tiny[section], key: value}, section)
    assert getattr(s, key) == value


# ---- presets


@pytest.mark.parametrize("group,preset", [(g, p) for g in SECTIONS for p in _presets(g)])
def test_every_preset_composes_into_settings(group, preset):
    # paper-in256's tokenizer needs a 256 px dataset only in config.validate; composing is enough here
    d = _section(group, preset)
    s = SECTIONS[group].from_dict(d, group)
    for key, value in d.items():
        if isinstance(value, (int, float, str, bool)) and not isinstance(getattr(s, key), dict):
            assert getattr(s, key) == value, key


@pytest.mark.parametrize("grid", ["default", "pair", "mini-paper", "gen-length"])
def test_every_grid_cell_checks(grid):
    _, cells = config.load([f"grid={grid}"])
    for cell in cells:
        check_sections(cell.cfg)


def test_check_sections_refuses_a_bad_override():
    c = OmegaConf.to_container(config._compose(["tokenizer.batch_size=abc"]), resolve=True)
    with pytest.raises(SettingsError, match=r"`tokenizer\.batch_size` must be int, got 'abc'"):
        check_sections(c)


# ---- defaults: the stage code's, documented against the cpu-tiny presets

# Defaults that differ from the cpu-tiny preset's value: the stage code's default when the key is
# absent (kept so that no output changes), and why the preset's value never meets it.
DIFFERS_FROM_CPU_TINY = {
    ("tokenizer", "precision"),   # absent = fp32; every tokenizer preset sets bf16
    ("tokenizer", "l2_weight"),   # absent = no L2 term; cpu-tiny sets 1.0, paper-in256 0.0
    ("tokenizer", "gan"),         # absent = no discriminator; cpu-tiny's has weight 0 (none built)
    ("tokenizer", "perceptual"),  # absent = none; only read when perceptual_weight > 0 (0 in cpu-tiny)
    ("tokenizer", "reproduces"),  # documentation
    ("generator", "model_args"),  # absent = the generator class's own defaults; cpu-tiny sets patch_size 2
    ("generator", "reproduces"), ("generator", "epochs"),
    ("eval", "bootstrap"),        # absent = no intervals; cpu-tiny sets 200 replicates
    ("eval", "domain"),           # absent = no domain detector; cpu-tiny enables it
    ("tokenizer", "stats_every"), # absent = no latent curve; cpu-tiny records one every 50 iterations
    ("tokenizer", "match_lr"),    # absent = lr throughout; cpu-tiny lowers the DM phase's to 3e-4
    ("generator", "snapshots"),   # absent = no EMA snapshots; cpu-tiny keeps three
}


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize("group", list(SECTIONS))
def test_defaults_equal_cpu_tiny_where_documented(group, tiny):
    preset = tiny[group]
    s = SECTIONS[group].from_dict(preset, group)
    for key, default in _defaults(SECTIONS[group]).items():
        if (group, key) in DIFFERS_FROM_CPU_TINY or key not in preset:
            continue
        assert getattr(s, key) == default, f"{group}.{key}: preset {getattr(s, key)!r}, default {default!r}"


@pytest.mark.parametrize("key", ["precision", "l2_weight"])
def test_every_tokenizer_preset_sets_keys_whose_default_differs(key):
    for preset in _presets("tokenizer"):
        assert key in _section("tokenizer", preset), f"tokenizer={preset} relies on the {key} default"


def test_cpu_tiny_off_switches_match_the_defaults(tiny):
    tc = TokenizerSettings.from_dict(tiny["tokenizer"], "tokenizer")
    assert tc.gan["weight"] == 0 and tc.perceptual_weight == 0  # no discriminator, no perceptual net


def test_absent_keys_take_the_stage_defaults(tiny):
    """The values the stages used before settings.py when a key was absent."""
    drop = {"precision", "perceptual_weight", "perceptual", "gan", "l2_weight", "warmup_frozen_encoder",
            "compile", "bottleneck_hidden", "reproduces"}
    tc = TokenizerSettings.from_dict({k: v for k, v in tiny["tokenizer"].items() if k not in drop}, "tokenizer")
    assert (tc.precision, tc.perceptual_weight, tc.perceptual, tc.gan, tc.l2_weight) == ("fp32", 0.0, None, None, 0.0)
    assert (tc.warmup_frozen_encoder, tc.compile, tc.bottleneck_hidden) == (False, False, 0)
    gc = GeneratorSettings.from_dict({k: v for k, v in tiny["generator"].items() if k != "model_args"}, "generator")
    assert gc.model_args == {}
    ev = EvalSettings.from_dict({k: v for k, v in tiny["eval"].items() if k != "extra_detectors"}, "eval")
    assert ev.extra_detectors == () and ev.label_mode == "balanced" and ev.ref_npz is None
    ds = DatasetSettings.from_dict({k: v for k, v in tiny["dataset"].items() if k != "root"}, "dataset")
    assert ds.root is None


# ---- config validation (benchmark/config.py's validate calls check_sections for every cell)

_VALIDATES = "check_sections" in __import__("inspect").getsource(config.validate)


@pytest.mark.skipif(not _VALIDATES, reason="benchmark/config.py's validate does not call check_sections yet")
@pytest.mark.parametrize("override,message", [
    ("tokenizer.batch_size=abc", r"`tokenizer\.batch_size` must be int, got 'abc'"),
    ("tokenizer.lr=[1]", r"`tokenizer\.lr` must be float, got \[1\]"),
    ("+tokenizer.batch_sise=3", r"unknown key tokenizer\.batch_sise \(did you mean tokenizer\.batch_size\?\)"),
    ("tokenizer.precision=fp16", r"`tokenizer\.precision` must be one of fp32, bf16"),
    ("generator.steps=1.5", r"`generator\.steps` must be int"),
    ("eval.sampler.steps=x", r"`eval\.sampler\.steps` must be int"),
    ("+dataset.resolutoin=32", r"unknown key dataset\.resolutoin"),
])
def test_config_load_refuses_bad_runner_settings(override, message):
    with pytest.raises(ValueError, match=message) as e:
        config.load(["grid=single", override])
    assert "cell " in str(e.value)  # config.validate names the cell
