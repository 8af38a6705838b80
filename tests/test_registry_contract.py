"""benchmark.registry: exact error messages, entry-point loading once, plugin import errors.

Names are the public API of the plug-in registries: the messages below are what a user sees
when a name is wrong, so they are checked word for word.
"""
from __future__ import annotations

import logging
import sys

import pytest

from benchmark import registry as reg_mod
from benchmark.registry import ENTRY_POINT_PREFIX, Registry, RegistryError, import_plugins


class _EP:
    def __init__(self, name, value, fn):
        self.name, self.value, self._fn = name, value, fn

    def load(self):
        return self._fn()


@pytest.fixture
def no_entry_points(monkeypatch):
    calls = []

    def fake(group):
        calls.append(group)
        return []

    monkeypatch.setattr(reg_mod.metadata, "entry_points", fake)
    return calls


def test_prefix():
    assert ENTRY_POINT_PREFIX == "dmvae_bench."


def test_register_returns_object_and_names_are_sorted(no_entry_points):
    r = Registry("widget")
    assert r.kind == "widget"

    class B:
        pass

    def a():
        pass

    assert r.register("b")(B) is B
    assert r.register("a")(a) is a
    assert r.names() == ["a", "b"]
    assert r.get("b") is B and r.get("a") is a
    assert "a" in r and "b" in r and "c" not in r


def test_duplicate_message_names_both_origins(no_entry_points):
    r = Registry("widget")
    r.register("x")(dict)          # builtins
    r.register("y")(_EP)           # this test module
    with pytest.raises(RegistryError) as e:
        r.register("x")(_EP)
    assert str(e.value) == (f"widget 'x' is registered twice: by builtins and by {__name__}. "
                            "Registered widgets: x, y")
    assert r.get("x") is dict  # the first registration stands


def test_origin_of_object_without_module(no_entry_points):
    r = Registry("widget")
    r.register("n")(3)             # an int has no __module__
    with pytest.raises(RegistryError, match=r"by \? and by builtins"):
        r.register("n")(dict)


def test_unknown_name_message(no_entry_points):
    r = Registry("widget")
    r.register("b")(dict)
    r.register("a")(list)
    with pytest.raises(RegistryError) as e:
        r.get("zz")
    assert str(e.value) == (
        "unknown widget 'zz'. Known widgets: a, b. Third-party widgets register through the "
        "entry-point group 'dmvae_bench.widgets' or a module named in `plugins=[...]`.")
    assert isinstance(e.value, LookupError)


def test_entry_points_loaded_once_from_the_kind_group(monkeypatch):
    r = Registry("gizmo")
    groups = []

    def fake(group):
        groups.append(group)
        return [_EP("p1", "pkg.mod:x", lambda: r.register("from-plugin")(dict))]

    monkeypatch.setattr(reg_mod.metadata, "entry_points", fake)
    assert "from-plugin" in r          # __contains__ loads plugins
    assert r.get("from-plugin") is dict
    r.load_plugins()
    assert groups == ["dmvae_bench.gizmos"]


def test_get_loads_plugins(monkeypatch):
    r = Registry("gizmo")
    monkeypatch.setattr(reg_mod.metadata, "entry_points",
                        lambda group: [_EP("p", "m:x", lambda: r.register("g")(set))])
    assert r.get("g") is set


def test_broken_entry_point_names_itself(monkeypatch):
    r = Registry("gizmo")
    r.register("ok")(dict)

    def broken():
        raise ImportError("no module named foo")

    monkeypatch.setattr(reg_mod.metadata, "entry_points", lambda group: [_EP("bad", "foo.bar:x", broken)])
    with pytest.raises(RegistryError) as e:
        r.load_plugins()
    assert str(e.value) == (
        "plugin 'bad' (foo.bar:x) in entry-point group 'dmvae_bench.gizmos' failed to import: "
        "ImportError('no module named foo'). Registered gizmos: ok")
    assert isinstance(e.value.__cause__, ImportError)


def test_registry_error_from_entry_point_passes_through(monkeypatch):
    r = Registry("gizmo")
    err = RegistryError("duplicate from plugin")

    def dup():
        raise err

    monkeypatch.setattr(reg_mod.metadata, "entry_points", lambda group: [_EP("d", "m:x", dup)])
    with pytest.raises(RegistryError) as e:
        r.load_plugins()
    assert e.value is err


def _write_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(body)


def test_import_plugins_imports_and_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "mut_plugin_ok", "LOADED = True\n")
    with caplog.at_level(logging.INFO, logger="benchmark.registry"):
        import_plugins(["mut_plugin_ok"])
    assert sys.modules["mut_plugin_ok"].LOADED
    assert "imported plugin module mut_plugin_ok" in caplog.messages
    monkeypatch.delitem(sys.modules, "mut_plugin_ok")


def test_import_plugins_wraps_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "mut_plugin_bad", "raise ValueError('boom')\n")
    with pytest.raises(RegistryError) as e:
        import_plugins(["mut_plugin_bad"])
    assert str(e.value) == "plugin module 'mut_plugin_bad' named in `plugins` failed to import: ValueError('boom')"
    assert isinstance(e.value.__cause__, ValueError)


def test_import_plugins_passes_registry_errors_through(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_module(tmp_path, "mut_plugin_dup",
                  "from benchmark.registry import RegistryError\nraise RegistryError('dup name')\n")
    with pytest.raises(RegistryError) as e:
        import_plugins(["mut_plugin_dup"])
    assert str(e.value) == "dup name"
