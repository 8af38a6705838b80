"""Compose the hydra config tree and expand a grid into cells.

We use hydra's compose API rather than @hydra.main so that the runner keeps its own working
directory and logging, while users get hydra's full override grammar
(``python -m benchmark.grid grid=single prior=gmm loss.lambda=10``).
Per cell, the grid's overrides are applied first and the command line's after them, so the
user always wins; a group chosen on the command line (``prior=gmm``) replaces the cell's.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from benchmark.registry import RegistryError, import_plugins
from benchmark.settings import GENERATOR_SIZE_KEYS, generator_epochs
from benchmark.store import stable_hash

log = logging.getLogger(__name__)

CONFIG_MODULE = "benchmark.conf"


@dataclass
class Cell:
    """One point of the grid: the fully resolved config (plain dicts) and its short label."""
    cfg: dict[str, Any]
    seed: int

    @property
    def keys(self) -> dict[str, Any]:
        c = self.cfg
        tok = c["tokenizer"].get("label") or c["tokenizer"]["preset"]
        if c["tokenizer"].get("design", "stage1") != "stage1":
            # Two designs of one preset are two table rows (grid=design), not seeds of one row.
            tok = f"{tok} ({c['tokenizer']['design']} design)"
        return {"dataset": c["dataset"]["name"], "prior": c["prior"].get("label") or c["prior"]["name"],
                "loss": c["loss"]["name"], "lambda": c["loss"]["lambda"],
                "tokenizer": tok, "generator": c["generator"]["preset"],
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
    """Comma sweeps (``prior=gaussian,gmm loss.lambda=1,10``) as hydra's basic sweeper expands
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


def load(overrides: list[str] | None = None, missing: list[str] | None = None) -> tuple[dict[str, Any], list[Cell]]:
    """Return (base config, cells). Validates every cell before anything runs.

    With ``missing`` (a list), assets that are not on this machine (a dataset tree, hub weights)
    are appended to it instead of raised: ``--plan`` shows a paper-scale sweep's cost on a laptop
    that has neither, and says what must be installed before it can run.

    Comma sweeps on the command line multiply the grid: every combination of swept values is
    applied to every cell of the grid preset (with or without hydra's ``--multirun``)."""
    hydra_overrides, optional = split_optional(renamed(list(overrides or [])))
    combos = expand_sweeps(hydra_overrides)
    base_dict: dict[str, Any] | None = None
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in combos:
        base, combo_cells = _cells_for(combo, optional)
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
    validate(base_dict, cells, missing)
    return base_dict, cells


def _run_settings(base: dict[str, Any]) -> tuple:
    return base.get("run_root"), stable_hash(base.get("launcher")), stable_hash(base.get("grid"))


# Renamed keys: the old spelling on a command line or in a grid preset still works, with a warning.
RENAMED = {"loss.weight": "loss.lambda", "prior.base_loss.weight": "prior.base_loss.lambda"}


def renamed(overrides: list[str]) -> list[str]:
    """Overrides with renamed keys spelled the current way (``loss.weight=10`` -> ``loss.lambda=10``)."""
    out = []
    for o in overrides:
        prefix = o[: len(o) - len(o.lstrip("+~?"))]
        key, sep, value = o[len(prefix):].partition("=")
        if key in RENAMED:
            log.warning("%s is now %s (one name for lambda in configs, records and tables)", key, RENAMED[key])
            o = f"{prefix}{RENAMED[key]}{sep}{value}"
        out.append(o)
    return out


def split_optional(overrides: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """``?key=value`` sets ``key`` only in the cells whose config has it: one command line can
    size a sweep whose cells use different plug-ins (``?prior.n_images=2048`` changes the feature
    priors' banks and leaves N(0, I) alone, where the key does not exist and would be an error).
    The value is parsed as YAML (numbers, lists, ``{a: 1}`` mappings); a plain override of the
    same key wins. Returns (hydra overrides, [(key, value)])."""
    plain, optional = [], []
    for o in overrides:
        if not o.startswith("?"):
            plain.append(o)
            continue
        key, sep, value = o[1:].partition("=")
        if not sep or not key:
            raise ValueError(f"{o!r}: an optional override is ?key=value")
        optional.append((key, yaml.safe_load(value)))
    return plain, optional


_ABSENT = object()


def _apply_optional(cfg: DictConfig, optional: list[tuple[str, Any]]) -> None:
    for key, value in optional:
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            OmegaConf.update(cfg, key, value, merge=False)


def _cells_for(overrides: list[str], optional: list[tuple[str, Any]] = ()) -> tuple[dict[str, Any], list[Cell]]:
    base = _compose(overrides)
    grid = OmegaConf.to_container(base.grid, resolve=True)
    plain_keys = {_key(o) for o in overrides}
    # A key the command line sets outright wins over an optional setting of it.
    optional = [(k, v) for k, v in optional if k not in plain_keys]
    user_keys = plain_keys | {k for k, _ in optional}
    # A group the user picks (prior=gmm) replaces the cell's, and with it the cell's settings of
    # that group's keys (prior.n_images=..., loss.lambda=...), which were meant for the cell's choice.
    user_groups = {k for k in user_keys if "." not in k}
    cells: list[Cell] = []
    # ``base``: overrides every cell of the grid shares (paper-table1: the ImageNet presets), applied
    # before the cell's own, so a cell may still change one of them.
    # Both may hold ``?key=value`` settings, applied only where the cell's config has the key
    # (the dm loss's score network in a grid that also has kl cells).
    shared = list(grid.get("base") or [])
    for cell_overrides in grid["cells"]:
        plain, own_optional = split_optional(renamed(shared + list(cell_overrides)))
        kept = [o for o in plain if _key(o) not in user_keys and _key(o).split(".", 1)[0] not in user_groups]
        cfg_dc = _compose(kept + overrides)
        _apply_optional(cfg_dc, [(k, v) for k, v in own_optional if k not in user_keys
                                 and k.split(".", 1)[0] not in user_groups] + list(optional))
        for seed in grid.get("seeds", [0]):
            cfg = OmegaConf.to_container(cfg_dc, resolve=True)
            cfg["seed"] = int(seed)
            derive_epochs(cfg)
            cells.append(Cell(cfg, int(seed)))
    return OmegaConf.to_container(base, resolve=True), cells


def derive_epochs(cfg: dict[str, Any]) -> None:
    """Set ``generator.epochs`` (documentation: tables, figures, ``--cfg job``) from what the
    generator stage runs, steps x batch_size / train_images, so that a grid or a command line that
    changes ``generator.steps`` cannot leave a stale epoch count behind. A stated value (``epochs``
    is not a setting of its own) must agree within 1%: it would otherwise read as a request for a
    training length that nothing runs."""
    g = cfg.get("generator")
    if not isinstance(g, dict) or not all(isinstance(g.get(k), (int, float)) for k in GENERATOR_SIZE_KEYS):
        return
    for k in GENERATOR_SIZE_KEYS:
        if g[k] <= 0:  # checked here, before any stage: every generator stage divides by them
            raise ValueError(f"generator.{k} must be positive, got {g[k]}")
    derived = round(generator_epochs(g), 4)
    stated = g.get("epochs")
    if stated is not None and abs(float(stated) - derived) > 0.01 * derived:
        raise ValueError(f"generator.epochs={stated} disagrees with generator.steps={g['steps']} x batch_size="
                         f"{g['batch_size']} / train_images={g['train_images']} = {derived:g} epochs: epochs is "
                         f"derived from those three; set generator.steps (e.g. generator.steps="
                         f"{round(float(stated) * g['train_images'] / g['batch_size'])}) instead")
    g["epochs"] = derived


def _missing_root(dataset: dict[str, Any]) -> str | None:
    """Why a file-backed dataset cannot be read here (its root is unset or absent), else None."""
    from benchmark.datasets import is_file_backed
    if not is_file_backed(str(dataset.get("name"))):
        return None
    root = dataset.get("root")
    if root and Path(str(root)).expanduser().is_dir():
        return None
    return f"dataset {dataset.get('name')}: dataset.root={root} is not a folder here; point it at the data tree"


def validate(base: dict[str, Any], cells: list[Cell], missing: list[str] | None = None) -> None:
    """Reject a bad grid before any stage runs: unknown names, unknown keys, bad values and
    impossible shapes. Each plug-in checks its own section (a ``validate`` class method; the
    loss's is MatchingLoss.validate unless it adds to it) and declares its upstream stages, which
    are resolved here too, so nothing in this function names a prior or a loss."""
    import_plugins(base.get("plugins", []))
    from benchmark.sweep_cost import grid_budget
    grid_budget(base, from_file=False)  # a malformed grid.budget stops here, not after the sweep
    from backbones.base import MissingWeightsError
    from benchmark.dag import latent_shape
    from benchmark.datasets import check_dataset
    from benchmark.metrics import DETECTORS
    from benchmark.plugin_keys import check_cell_keys
    from benchmark.settings import check_sections
    from benchmark.upstream import STAGES, Need, declared
    from generators import GENERATORS
    from priors import LOSSES, PRIORS
    from tokenizers import DECODERS, ENCODERS

    for cell in cells:
        c = cell.cfg
        import_plugins(c.get("plugins", []))
        try:
            check_sections(c)  # tokenizer, generator, eval, dataset: known keys, typed values
            absent = _missing_root(c["dataset"]) if missing is not None else None
            if absent is None:
                check_dataset(c["dataset"])  # a known dataset; a file-backed one's root exists and holds images
            elif absent not in missing:
                missing.append(absent)
            check_cell_keys(c)  # every plug-in section holds only keys its plug-in takes
            prior_cls, loss_cls = PRIORS.get(c["prior"]["name"]), LOSSES.get(c["loss"]["name"])
            for plugin in (prior_cls, loss_cls):
                check = getattr(plugin, "validate", None)
                if callable(check):
                    try:
                        check(c)
                    except MissingWeightsError as exc:
                        if missing is None:
                            raise
                        if str(exc) not in missing:
                            missing.append(str(exc))
                for role, need in declared(plugin, c).items():  # unknown stage kinds, bad needs
                    if isinstance(need, Need):
                        STAGES.get(need.stage)
            tok, res = c["tokenizer"], int(c["dataset"]["resolution"])
            enc_cls, dec_cls = ENCODERS.get(tok["encoder"]["name"]), DECODERS.get(tok["decoder"]["name"])
            if callable(getattr(enc_cls, "validate", None)):
                enc_cls.validate(tok["encoder"], res)
            side = latent_shape(c)[1]
            up = getattr(dec_cls, "upsampling", None)
            if callable(up) and side * up(tok["decoder"]) != res:
                raise ValueError(f"the tokenizer's {side}x{side} latent grid decodes to {side * up(tok['decoder'])} px, "
                                 f"but dataset {c['dataset']['name']} is {res} px: tokenizer={tok.get('preset')} does "
                                 f"not fit this dataset (pick a tokenizer preset for {res} px, or a dataset at the "
                                 f"preset's resolution)")
            if c["generator"]["model"] not in GENERATORS:
                raise RegistryError(f"unknown generator {c['generator']['model']!r}. "
                                    f"Known generators: {', '.join(sorted(GENERATORS))}")
            patch = int(c["generator"].get("model_args", {}).get("patch_size", 1))
            if side % patch:
                raise ValueError(f"latent grid {side}x{side} is not divisible by the generator patch size {patch}")
            ev = c["eval"]
            for det in [ev["detector"], *ev.get("extra_detectors", [])]:
                DETECTORS.get(det)  # an unknown name lists the known ones (plug-ins' included)
            if ev["n_samples"] < 2 or ev["n_ref"] < 2:
                raise ValueError("eval.n_samples and eval.n_ref must be at least 2 for a covariance")
        except (ValueError, LookupError) as exc:
            # Name the cell: in a sweep the same preset may be fine in one cell and not another.
            raise type(exc)(f"cell {cell.label}: {exc}") from exc
