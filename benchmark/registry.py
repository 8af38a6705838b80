"""One registry per plug-in kind (priors, matching losses, encoders, ...).

Names are the public API: a duplicate name is an error, and an unknown name lists the known
ones. Third-party packages add entries either through a Python entry point in the group
``dmvae_bench.<kind>`` (e.g. ``dmvae_bench.priors``) or by naming a module to import in the
config (``plugins=[my_pkg.my_prior]``); both simply import a module whose decorators register.
"""
from __future__ import annotations

import importlib
import logging
from importlib import metadata
from typing import Callable, Generic, Iterable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

ENTRY_POINT_PREFIX = "dmvae_bench."


class RegistryError(LookupError):
    """Raised for unknown names, duplicate names and plugins that fail to load."""


class Registry(Generic[T]):
    def __init__(self, kind: str, plural: str | None = None, legacy_groups: tuple[str, ...] = ()) -> None:
        self.kind = kind
        # The entry-point group is the plural of the kind ("dmvae_bench.priors"); irregular
        # plurals are given, and groups spelled differently by earlier releases still load.
        self.group = f"{ENTRY_POINT_PREFIX}{plural or kind + 's'}"
        self.legacy_groups = tuple(legacy_groups)
        self._entries: dict[str, T] = {}
        self._origin: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            origin = getattr(obj, "__module__", "?")
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is registered twice: by {self._origin[name]} and by "
                    f"{origin}. Registered {self.kind}s: {', '.join(self.names())}"
                )
            self._entries[name] = obj
            self._origin[name] = origin
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._entries

    def get(self, name: str) -> T:
        self.load_plugins()
        if name not in self._entries:
            raise RegistryError(
                f"unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(self.names())}. "
                f"Third-party {self.kind}s register through the entry-point group "
                f"'{self.group}' or a module named in `plugins=[...]`."
            )
        return self._entries[name]

    def load_plugins(self) -> None:
        """Import every module advertised under this kind's entry-point group (once)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for group in (self.group, *self.legacy_groups):
            for ep in metadata.entry_points(group=group):
                if group != self.group:
                    log.warning("plugin %r uses the old entry-point group %r; rename it to %r",
                                ep.name, group, self.group)
                try:
                    ep.load()
                except RegistryError:
                    raise
                except Exception as exc:  # a broken plugin must name itself, not crash obscurely
                    raise RegistryError(
                        f"plugin {ep.name!r} ({ep.value}) in entry-point group {group!r} failed to "
                        f"import: {exc!r}. Registered {self.kind}s: {', '.join(self.names())}"
                    ) from exc


def import_plugins(modules: Iterable[str]) -> None:
    """Import user modules named in the config so that their decorators register."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                f"plugin module {mod!r} named in `plugins` failed to import: {exc!r}"
            ) from exc
        log.info("imported plugin module %s", mod)
