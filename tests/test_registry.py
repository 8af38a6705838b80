import pytest

from benchmark.registry import Registry, RegistryError, import_plugins
from priors import LOSSES, PRIORS


def test_duplicate_name_is_an_error():
    reg = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a")(dict)


def test_unknown_name_lists_known():
    with pytest.raises(RegistryError) as e:
        PRIORS.get("no-such-prior")
    assert "gaussian" in str(e.value) and "gmm" in str(e.value)
    with pytest.raises(RegistryError, match="dm"):
        LOSSES.get("nope")


def test_plugin_module_failing_to_import_names_itself():
    with pytest.raises(RegistryError, match="definitely_not_a_module"):
        import_plugins(["definitely_not_a_module"])
