"""The GPU check runs its code path at the CPU presets' sizes (a GPU is never needed in CI):
every stage step is finite and measured, and the files the cost model reads are written."""
from __future__ import annotations

import json

import pytest
import torch

from benchmark import gpu_check, plan
from benchmark.host_cpu import cpu_facts


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path, monkeypatch):
    assert gpu_check.main(["--tiny", "--steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu-cpu.json").read_text())
    names = [r["case"] for r in res["cases"]]
    assert any(n.startswith("generator step") for n in names) and any(n.startswith("teacher step") for n in names)
    assert any(n.startswith("gen_eval: decode") for n in names) and any(n.startswith("latent_cache") for n in names)
    for r in res["cases"]:
        assert r["finite"] and r["throughput"] > 0 and 0 < r["mfu"] < 1.5, r
    assert res["all_finite"] and 0 < res["mfu"] < 1
    assert "| generator step (flow matching) |" in (tmp_path / "gpu-cpu.md").read_text()
    # On the CPU the label names the host's model (hosts differ in speed and rounding).
    assert cpu_facts()["model"] in res["device"] and cpu_facts()["model"] in (tmp_path / "gpu-cpu.md").read_text()
    # A measured MFU on record replaces the plan's assumed one for that GPU.
    monkeypatch.setattr(plan, "PROJECT_ROOT", tmp_path.parent)
    (tmp_path.parent / "results" / "perf").mkdir(parents=True)
    (tmp_path.parent / "results" / "perf" / "gpu-h200.json").write_text(json.dumps({"mfu": 0.31}))
    assert plan.utilisation("h200", None)[0] == 0.31 and "measured" in plan.utilisation("h200", None)[1]
    assert plan.utilisation("h100", None)[0] == plan.DEFAULT_MFU


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the paper-scale check runs for real")
def test_paper_check_refuses_without_gpu(caplog):
    assert gpu_check.main(["--out", "/nonexistent"]) == 2
    assert "needs a GPU" in caplog.text
