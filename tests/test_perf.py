"""The perf harness runs on a tiny case (benchmarks are not timed tests)."""
import json

import pytest

from benchmark import perf


@pytest.mark.slow
def test_perf_harness_runs_tiny(tmp_path):
    tiny = ["tokenizer.batch_size=4", "tokenizer.encoder.ch=8", "tokenizer.decoder.ch=8",
            "generator.batch_size=4", "eval.sampler.steps=2",
            "++loss.score_net_args.hidden_size=32", "++loss.score_net_args.depth=1",
            "++loss.score_net_args.num_heads=2"]
    res = perf.run(tiny, reps=1, quick=True, out_dir=tmp_path)
    assert res["matmul_peak_gflops"]["fp32"] > 0
    names = [c["case"] for c in res["cases"]]
    assert any("generator" in n for n in names) and any("inception" in n for n in names)
    for c in res["cases"]:
        assert c["throughput"] > 0 and c["gflop_per_step"] > 0 and 0 < c["fraction_of_peak"]
        assert c["precision"] in ("fp32", "bf16", "mixed")
    # every bf16 step is measured against the bf16 peak, not fp32's
    bf16 = [c for c in res["cases"] if c["precision"] == "bf16"]
    assert bf16 and all(c["fraction_of_peak"] == pytest.approx(c["gflops"] / res["matmul_peak_gflops"]["bf16"])
                        for c in bf16)
    data = json.loads(next(tmp_path.glob("perf_*.json")).read_text())
    assert data["cases"] == res["cases"]
    from benchmark.host_cpu import cpu_facts
    assert data["machine"]["cpu"] == cpu_facts()  # which host's kernels the peaks are of
    md = next(tmp_path.glob("perf_*.md")).read_text()
    assert "% of its peak" in md and cpu_facts()["model"] in md
