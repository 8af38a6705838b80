"""Plug-ins describe themselves: the config keys a factory accepts, read from its signature.

A plug-in (prior, matching loss, backbone, encoder, decoder, generator) is built from its config
section as ``factory(**section, **runner_args)``. Its keyword parameters *are* its config keys,
so a misspelled key (``+prior.compnent_std=0.3``) can be refused before any stage runs, with
the path, the known keys and a close match, instead of being swallowed by ``**kwargs``.

Rules for plug-in authors:
- list every config key as a keyword parameter; do **not** take ``**kwargs`` for config keys.
  Such a factory cannot be checked, and :func:`check_keys` refuses it with a TypeError;
- keys of your section that another stage reads (and the runner removes before calling you)
  go into a class attribute ``config_keys_read_elsewhere = ("teacher_steps", ...)`` (a function
  attribute of the same name for a function factory). Keys the builder does not remove must
  stay parameters, even unused ones, or the call fails.

This module is the bottom layer: standard library only, no registry, no runner import.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable


class ConfigError(ValueError):
    """A config section holds keys its plug-in does not take (or lacks ones it needs)."""


def _parameters(factory: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError) as exc:  # builtins and some C callables have no signature
        raise TypeError(f"{_describe(factory)}: its signature cannot be read ({exc})") from exc
    # A class's signature already drops `self`; a plain function never has it.
    return [p for p in params if p.name != "self"]


def takes_var_keywords(factory: Callable[..., Any]) -> bool:
    """True when the factory has ``**kwargs``: then its config keys cannot be known."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(factory))


def config_keys(factory: Callable[..., Any], runner_args: Iterable[str] = ()) -> tuple[set[str], set[str]]:
    """(accepted, required): the keyword parameters the factory takes from its config section,
    and those of them without a default. ``runner_args`` (latent_shape, in_channels, ...) are
    passed by the runner itself, so they are not config keys."""
    skip = set(runner_args)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in _parameters(factory) if p.kind in keyword and p.name not in skip]
    return ({p.name for p in params},
            {p.name for p in params if p.default is inspect.Parameter.empty})


def read_elsewhere(factory: Callable[..., Any]) -> frozenset[str]:
    """Keys the plug-in declares as read by another stage (``config_keys_read_elsewhere``)."""
    return frozenset(getattr(factory, "config_keys_read_elsewhere", ()))


def check_keys(kind: str, name: str, factory: Callable[..., Any], cfg: dict[str, Any], where: str,
               runner_args: Iterable[str] = (), extra_keys: Iterable[str] = ()) -> None:
    """Raise ConfigError when ``cfg`` (the section at config path ``where``) holds a key that the
    ``kind`` plug-in ``name`` does not accept, or lacks a key it requires.

    Accepted: the factory's keyword parameters (less ``runner_args``), its declared
    ``config_keys_read_elsewhere`` and ``extra_keys`` (the caller's: ``name``, which the runner
    pops to pick the registry entry).
    A key that is a runner argument is refused too: the runner passes it, the config must not.
    """
    if takes_var_keywords(factory):
        raise TypeError(
            f"{kind} {name!r} ({_describe(factory)}) cannot be checked: it takes **kwargs, so any "
            f"misspelled key under `{where}` would be ignored. List its config keys as keyword "
            f"parameters, and put keys that another stage reads in `config_keys_read_elsewhere`.")
    runner = set(runner_args)
    accepted, required = config_keys(factory, runner)
    known = accepted | read_elsewhere(factory) | set(extra_keys)
    check_known_keys(kind, name, cfg, where, known, runner)
    missing = sorted(required - set(cfg))
    if missing:
        raise ConfigError(f"{kind} {name!r} needs {', '.join(f'`{where}.{k}`' for k in missing)}; "
                          f"known keys: {', '.join(sorted(known))}")


def check_known_keys(kind: str, name: str, cfg: dict[str, Any], where: str, known: Iterable[str],
                     runner_args: Iterable[str] = ()) -> None:
    """Raise ConfigError for keys of ``cfg`` outside ``known``: for sections that are plain
    settings rather than a factory's parameters (a feature prior's ``stage1``)."""
    known, runner = set(known), set(runner_args)
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise ConfigError(_unknown_message(kind, name, where, unknown, known, runner))


def _unknown_message(kind: str, name: str, where: str, unknown: list[str], known: set[str],
                     runner: set[str]) -> str:
    lines = []
    for key in unknown:
        if key in runner:
            # The runner passes it (from the dataset or the tokenizer); a config value would clash.
            hint = " (the runner sets it; remove it from the config)"
        else:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean `{where}.{close[0]}`?)" if close else ""
        lines.append(f"`{where}.{key}`{hint}")
    return (f"unknown key{'s' if len(unknown) > 1 else ''} for {kind} {name!r}: {', '.join(lines)}. "
            f"Known keys of `{where}`: {', '.join(sorted(known))}")


def _describe(factory: Callable[..., Any]) -> str:
    target = getattr(factory, "func", factory)  # functools.partial: name the wrapped callable
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"
