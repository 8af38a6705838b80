"""benchmark.upstream: the stage-kind registry and the plug-ins' declared needs, checked value by
value (the mutation benchmark's survivors in this module were untested messages and defaults)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark import upstream
from benchmark.registry import RegistryError
from benchmark.upstream import Need, StageOf, StageKind, data_slice, declared, register_stage


def test_pipeline_is_the_seven_stages_every_cell_runs():
    assert upstream.PIPELINE == ("fid_ref", "reference", "tokenizer", "recon_eval", "latent_cache", "generator",
                                 "gen_eval")


def test_register_stage_records_every_field_and_refuses_duplicates(tmp_path, monkeypatch):
    (tmp_path / "kind_with_output.py").write_text(
        "def run(node):\n    return {'ran': node.key}\n\ndef output(node):\n    return ('out', node.key)\n")
    (tmp_path / "kind_without_output.py").write_text("def run(node):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = register_stage("contract-kind-a", "3", "kind_with_output", distributed=1, doc="a doc")
    assert a == StageKind("contract-kind-a", 3, "kind_with_output", True, "a doc")
    assert isinstance(a.version, int) and a.distributed is True
    assert upstream.STAGES.get("contract-kind-a") is a
    b = register_stage("contract-kind-b", 1, "kind_without_output")
    assert (b.distributed, b.doc) == (False, "")
    node = SimpleNamespace(key="k-1", dir=str(tmp_path / "d"))
    assert a.run(node) == {"ran": "k-1"} and a.output(node) == ("out", "k-1")
    out = b.output(node)   # no output(): dependants get the run directory, as a Path
    assert isinstance(out, Path) and out == tmp_path / "d"
    with pytest.raises(RegistryError, match="registered twice"):
        register_stage("contract-kind-a", 1, "kind_with_output")


def test_builtin_stage_kinds_are_registered_with_their_versions():
    import benchmark.stages  # noqa: F401
    kinds = {n: upstream.STAGES.get(n) for n in ("domain_detector", "fid_ref", "ssl_backbone", "reference", "teacher",
                                                 "tokenizer", "recon_eval", "latent_cache", "generator",
                                                 "gen_eval")}
    assert {n: k.version for n, k in kinds.items()} == {"domain_detector": 1, "fid_ref": 1, "ssl_backbone": 1, "reference": 3,
                                                       "teacher": 3, "tokenizer": 2, "recon_eval": 1,
                                                       "latent_cache": 1, "generator": 3, "gen_eval": 2}
    assert {n for n, k in kinds.items() if k.distributed} == {
        "domain_detector", "tokenizer", "teacher", "ssl_backbone", "reference", "fid_ref", "recon_eval",
        "latent_cache", "generator", "gen_eval"}
    assert all(k.module == f"benchmark.stages.{n}" for n, k in kinds.items())
    with pytest.raises(RegistryError, match="unknown stage 'nope'.*dmvae_bench.stages"):
        upstream.STAGES.get("nope")


def test_need_and_stage_of_defaults():
    n = Need("teacher")
    assert (n.stage, n.params, n.after) == ("teacher", {}, ())
    assert Need("x").params is not Need("y").params  # no shared mutable default
    s = StageOf("tokenizer", {"a": 1})
    assert (s.stage, s.cfg) == ("tokenizer", {"a": 1})


def test_data_slice_is_name_and_resolution_only():
    cfg = {"dataset": {"name": "d", "resolution": 64, "channels": 3, "num_classes": 7, "root": "/x"}}
    assert data_slice(cfg) == {"name": "d", "resolution": 64}


def test_declared_reads_upstream_and_checks_its_values():
    class NoUpstream:
        pass

    class NotCallable:
        upstream = {"x": Need("y")}

    class ReturnsNone:
        @classmethod
        def upstream(cls, cfg):
            return None

    class Good:
        needs = {"t": Need("teacher", {"a": 1}, after=("reference",)), "b": StageOf("tokenizer", {})}

        @classmethod
        def upstream(cls, cfg):
            return cls.needs

    class Bad:
        @classmethod
        def upstream(cls, cfg):
            return {"oops": "teacher"}

    assert declared(NoUpstream, {}) == {} and declared(NotCallable, {}) == {} and declared(ReturnsNone, {}) == {}
    got = declared(Good, {})
    assert got == Good.needs and got is not Good.needs
    with pytest.raises(TypeError) as e:
        declared(Bad, {})
    assert str(e.value) == "Bad.upstream: role 'oops' must map to a Need or StageOf, got str"
