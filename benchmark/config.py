"""Compose the hydra config tree and expand a grid into cells.

We use hydra's compose API rather than @hydra.main so that the runner keeps its own working
directory and logging, while users get hydra's full override grammar
(``python -m benchmark.grid grid=single prior=gmm loss.weight=10``).
Per cell, the grid's overrides are applied first and the command line's after them, so the
user always wins; a group chosen on the command line (``prior=gmm``) replaces the cell's.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from benchmark.registry import RegistryError, import_plugins
from benchmark.store import stable_hash

CONFIG_MODULE = "benchmark.conf"


@dataclass
class Cell:
    """One point of the grid: the fully resolved config (plain dicts) and its short label."""
    cfg: dict[str, Any]
    seed: int

    @property
    def keys(self) -> dict[str, Any]:
        c = self.cfg
        return {"dataset": c["dataset"]["name"], "prior": c["prior"].get("label") or c["prior"]["name"],
                "loss": c["loss"]["name"], "lambda": c["loss"]["weight"],
                "tokenizer": c["tokenizer"]["preset"], "generator": c["generator"]["preset"],
                "seed": self.seed}

    @property
    def label(self) -> str:
        k = self.keys
        return f"{k['prior']}/{k['loss']}(λ={k['lambda']:g})/s{k['seed']}"


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Comma sweeps (``prior=gaussian,gmm loss.weight=1,10``) as hydra's basic sweeper expands
    them: the product of every swept key's values, in command-line order; other overrides are
    kept as typed. Lists (``grid.seeds=[0,1]``) are values, not sweeps. ``range(...)`` and
    ``choice(...)`` enumerate; ``interval(...)`` is refused, as the basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes: list[list[str]] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            axes.append([o.input_line])
        elif o.is_discrete_sweep():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            raise ValueError(f"{o.input_line}: only comma sweeps (a,b,c), choice(...) and range(...) expand here, "
                             f"not {o.value_type.name.lower()} sweeps")
    return [list(combo) for combo in itertools.product(*axes)]


def load(overrides: list[str] | None = None) -> tuple[dict[str, Any], list[Cell]]:
    """Return (base config, cells). Validates every cell before anything runs.

    Comma sweeps on the command line multiply the grid: every combination of swept values is
    applied to every cell of the grid preset (with or without hydra's ``--multirun``)."""
    combos = expand_sweeps(list(overrides or []))
    base_dict: dict[str, Any] | None = None
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in combos:
        base, combo_cells = _cells_for(combo)
        if base_dict is None:
            base_dict = base
        elif _run_settings(base) != _run_settings(base_dict):
            raise ValueError("run_root, launcher and grid cannot be swept: they define where and how "
                             "the whole sweep runs, not a cell")
        for cell in combo_cells:  # two combinations may resolve to the same cell: run it once
            ident = stable_hash(cell.cfg)
            if ident not in seen:
                seen.add(ident)
                cells.append(cell)
    assert base_dict is not None
    validate(base_dict, cells)
    return base_dict, cells


def _run_settings(base: dict[str, Any]) -> tuple:
    return base.get("run_root"), stable_hash(base.get("launcher")), stable_hash(base.get("grid"))


def _cells_for(overrides: list[str]) -> tuple[dict[str, Any], list[Cell]]:
    base = _compose(overrides)
    grid = OmegaConf.to_container(base.grid, resolve=True)
    user_keys = {_key(o) for o in overrides}
    # A group the user picks (prior=gmm) replaces the cell's, and with it the cell's settings of
    # that group's keys (prior.n_images=..., loss.weight=...), which were meant for the cell's choice.
    user_groups = {k for k in user_keys if "." not in k}
    cells: list[Cell] = []
    for cell_overrides in grid["cells"]:
        kept = [o for o in cell_overrides if _key(o) not in user_keys
                and _key(o).split(".", 1)[0] not in user_groups]
        cfg_dc = _compose(kept + overrides)
        for seed in grid.get("seeds", [0]):
            cfg = OmegaConf.to_container(cfg_dc, resolve=True)
            cfg["seed"] = int(seed)
            cells.append(Cell(cfg, int(seed)))
    return OmegaConf.to_container(base, resolve=True), cells


def validate(base: dict[str, Any], cells: list[Cell]) -> None:
    """Reject a bad grid before any stage runs: unknown names and impossible shapes."""
    import_plugins(base.get("plugins", []))
    from priors import LOSSES, PRIORS
    from tokenizers import DECODERS, ENCODERS
    from generators import GENERATORS

    for cell in cells:
        c = cell.cfg
        import_plugins(c.get("plugins", []))
        PRIORS.get(c["prior"]["name"])
        _preflight_prior(c["prior"])
        LOSSES.get(c["loss"]["name"])
        weight = c["loss"].get("weight", 0.0)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            # The loss classes check this too, but only when the tokenizer stage builds them,
            # after the reference and teacher stages have run.
            raise ValueError(f"cell {cell.label}: loss.weight (lambda) must be a finite number >= 0, got {weight!r}")
        ENCODERS.get(c["tokenizer"]["encoder"]["name"])
        DECODERS.get(c["tokenizer"]["decoder"]["name"])
        for name in (c["generator"]["model"],) + ((c["loss"].get("score_net"),) if c["loss"]["name"] == "dm" else ()):
            if name not in GENERATORS:
                raise RegistryError(f"unknown generator {name!r}. Known generators: {', '.join(sorted(GENERATORS))}")
        tok = c["tokenizer"]
        res = c["dataset"]["resolution"]
        if tok["encoder"]["name"] == "conv":
            down = 2 ** (len(tok["encoder"].get("mult", [1])) - 1)
            if res % down:
                raise ValueError(f"cell {cell.label}: image size {res} is not divisible by the encoder's "
                                 f"downsampling factor {down} (tokenizer.encoder.mult={tok['encoder'].get('mult')})")
        from benchmark.dag import latent_shape
        side = latent_shape(c)[1]
        patch = int(c["generator"].get("model_args", {}).get("patch_size", 1))
        if side % patch:
            raise ValueError(f"cell {cell.label}: latent grid {side}x{side} is not divisible by the "
                             f"generator patch size {patch}")
        ev = c["eval"]
        from benchmark.metrics import DETECTORS
        for det in [ev["detector"], *ev.get("extra_detectors", [])]:
            if det not in DETECTORS:
                raise RegistryError(f"unknown detector {det!r}. Known detectors: {', '.join(sorted(DETECTORS))}")
        if ev["n_samples"] < 2 or ev["n_ref"] < 2:
            raise ValueError("eval.n_samples and eval.n_ref must be at least 2 for a covariance")
        if c["loss"]["name"] == "dm" and c["loss"].get("teacher") not in ("auto", "exact", "trained"):
            raise ValueError(f"loss.teacher must be auto, exact or trained; got {c['loss'].get('teacher')!r}")


def _preflight_prior(prior: dict[str, Any]) -> None:
    """Missing backbone or text-tower weights fail here, before any stage runs."""
    from backbones import BACKBONES, preflight
    from benchmark.dag import _bank_cfg
    bank = _bank_cfg(prior)
    bb = bank.get("backbone")
    if isinstance(bb, dict) and "name" in bb:  # (test overrides may add size keys to any prior)
        BACKBONES.get(bb["name"])
        if bb.get("name") != "offline-mae":  # its checkpoint is made by the ssl_backbone stage
            preflight(bb, "prior.backbone")
    preflight(prior.get("text_encoder"), "prior.text_encoder")
