"""``python -m benchmark.grid ... --plan``: every stage job listed with its resources and cost,
nothing submitted or run, and profiles that cannot finish a stage rejected."""
from __future__ import annotations

import json
import math

import pytest

from benchmark import config, grid, plan
from benchmark.store import write_json

PAPER_CELL = ["grid=single", "tokenizer=paper-in256", "generator=paper-in256", "dataset=imagenet",
              "prior=gaussian", "loss=dm", "launcher=slurm", "launcher.profile=gpu-cluster"]


def _plan_json(root) -> dict:
    (sweep,) = list((root / "sweeps").iterdir())
    assert (sweep / "plan.md").exists()
    return json.loads((sweep / "plan.json").read_text())


def test_plan_lists_every_stage_and_runs_nothing(tmp_path, capsys):
    assert grid.main(["--plan", f"run_root={tmp_path}"]) == 0
    p = _plan_json(tmp_path)
    _, cells, order, _, _ = grid.prepare([f"run_root={tmp_path}"])
    assert [r["key"] for r in p["stages"]] == [n.key for n in order]
    assert not (tmp_path / "stages").exists()  # nothing ran
    # Every stage shared by all the cells says so; the tokenizers belong to one cell each.
    by_stage = {r["stage"]: r for r in p["stages"]}
    assert by_stage["fid_ref"]["status"] == f"to run, shared by {len(cells)} cells"
    assert math.isfinite(p["total_gpu_hours"]) and p["total_gpu_hours"] > 0
    assert "assumed" in p["mfu_source"] and p["mfu"] == plan.DEFAULT_MFU
    assert "Total:" in capsys.readouterr().out


def test_done_stage_is_not_counted(tmp_path):
    overrides = [f"run_root={tmp_path}", "grid=single", "prior=gaussian", "loss=kl"]
    _, _, order, _, _ = grid.prepare(overrides)
    gen = next(n for n in order if n.stage == "generator")
    write_json(gen.record_path, {"facts": {}})
    assert grid.main(["--plan", *overrides]) == 0
    rows = {r["stage"]: r for r in _plan_json(tmp_path)["stages"]}
    assert rows["generator"]["status"] == "done"
    total = _plan_json(tmp_path)["total_gpu_hours"]
    todo = sum(r["gpu_hours"] for r in rows.values() if r["status"] != "done" and math.isfinite(r["gpu_hours"]))
    assert total == pytest.approx(todo)


def test_paper_scale_cost_counts_the_models(tmp_path):
    """LightningDiT-XL/1 on 16x16x32 latents: the forward counted from the model is twice the
    DiT paper's 118.6 G multiply-adds of DiT-XL/2 at the same 256 tokens (PAPER_SCALE.md), within
    10%; a generator step is 3 forwards of its 1,024 latents."""
    assert grid.main(["--plan", "--gpu", "h200", "--mfu", "0.5", f"run_root={tmp_path}", *PAPER_CELL]) == 0
    p = _plan_json(tmp_path)
    assert p["gpu"] == "h200" and p["mfu"] == 0.5 and p["mfu_source"] == "given with --mfu"
    gen = next(r for r in p["stages"] if r["stage"] == "generator")
    fwd = gen["flops"] / (3 * 1024 * 80073)
    assert fwd == pytest.approx(2 * 118.6e9, rel=0.10)
    assert gen["gpus"] == 8 and gen["resources"]["tasks_per_node"] == 8
    peak = plan.GPU_PEAKS["h200"][gen["precision"]] * 1e12
    assert gen["gpu_hours"] == pytest.approx(gen["flops"] / (peak * 0.5) / 3600)
    assert gen["wall_hours"] == pytest.approx(gen["gpu_hours"] / 8)
    assert gen["limit_min"] >= gen["wall_hours"] * 60 * plan.LIMIT_MARGIN


def test_profile_that_cannot_finish_is_rejected(tmp_path, caplog):
    bad = [*PAPER_CELL, "launcher.stages.generator.timeout_min=60", "launcher.max_requeues=1"]
    assert grid.main(["--plan", f"run_root={tmp_path}", *bad]) == 2
    assert "cannot finish" in caplog.text and "generator" in caplog.text and "max_requeues" in caplog.text


@pytest.mark.parametrize("flags, words", [(["--gpu", "tpu9"], "unknown GPU 'tpu9'"),
                                          (["--mfu", "1.5"], "--mfu takes a number in (0, 1]")])
def test_bad_plan_flags(tmp_path, caplog, flags, words):
    assert grid.main(["--plan", *flags, f"run_root={tmp_path}", "grid=single"]) == 2
    assert words in caplog.text


def test_more_tasks_than_gpus_is_rejected(tmp_path, caplog):
    over = [*PAPER_CELL, "launcher.stages.generator.tasks_per_node=16"]
    assert grid.main(["--plan", f"run_root={tmp_path}", *over]) == 2
    assert "tasks_per_node=16" in caplog.text and "gpus_per_node=8" in caplog.text


def test_paper_table1_plan_runs_here(tmp_path, capsys):
    """The paper's Table 1 on a machine without ImageNet or hub weights: every stage job is
    listed with its SLURM resources, the total is finite, and what is missing is named."""
    assert grid.main(["--plan", f"run_root={tmp_path}", "grid=paper-table1", "launcher=slurm",
                      "launcher.profile=gpu-cluster"]) == 0
    p = _plan_json(tmp_path)
    _, cells, order, _, _ = grid.prepare([f"run_root={tmp_path}", "grid=paper-table1"], missing=[])
    assert len(cells) == 8 and len(p["stages"]) == len(order)
    for r in p["stages"]:
        assert {"nodes", "gpus_per_node", "timeout_min", "mem_gb"} <= set(r["resources"])
    assert math.isfinite(p["total_gpu_hours"]) and p["total_gpu_hours"] > 1000
    assert any("dataset.root" in m for m in p["missing"])
    assert any("hf download timm/vit_large_patch14_dinov2.lvd142m" in m for m in p["missing"])
    assert "Not on this machine" in capsys.readouterr().out


def test_paper_table1_without_plan_is_refused(tmp_path, caplog):
    assert grid.main([f"run_root={tmp_path}", "grid=paper-table1"]) == 2
    assert "dataset.root" in caplog.text
    assert not (tmp_path / "stages").exists()


def test_submission_refused_when_a_limit_cannot_finish(tmp_path, caplog, monkeypatch):
    """The same check guards a real submission, before the controller is even asked."""
    from benchmark import launch_slurm
    monkeypatch.setattr(launch_slurm, "controller_reachable", lambda: pytest.fail("asked the controller"))
    bad = [*PAPER_CELL, "launcher.stages.generator.timeout_min=60",
           "launcher.max_requeues=1"]
    base, _ = config.load(bad, missing=[])
    _, _, order, _, sweep = grid.prepare([f"run_root={tmp_path}", *bad], missing=[])
    assert launch_slurm.launch(base, order, sweep, bad) == 2
    assert "not submitted" in caplog.text and "generator" in caplog.text


def test_auto_time_limit_comes_from_the_cost_model(tmp_path):
    from benchmark import launch_slurm
    over = [*PAPER_CELL, "launcher.stages.generator.timeout_min=auto"]
    assert grid.main(["--plan", f"run_root={tmp_path}", *over]) == 0
    gen = next(r for r in _plan_json(tmp_path)["stages"] if r["stage"] == "generator")
    assert gen["resources"]["timeout_min"] == f"auto ({gen['limit_min']})"
    base, _ = config.load(over, missing=[])
    cfg = launch_slurm.resolve(base["launcher"], over)
    assert launch_slurm.executor_parameters(cfg, "generator", "g", gen["limit_min"])["time"] == gen["limit_min"]


def test_domain_detector_and_offline_mae_are_costed(tmp_path):
    """The default grid's two stage kinds that had no cost model: the domain classifier's
    convolutions and linears counted by hand (multiply-adds x 2), and the offline MAE's masked
    training forward against its own analytic count (backbones/offline_mae.py, which leaves out
    the patch embedding and the pixel head), within 15%."""
    from backbones.offline_mae import MAE, mae_flops_per_image
    assert grid.main(["--plan", f"run_root={tmp_path}"]) == 0
    rows = {r["stage"]: r for r in _plan_json(tmp_path)["stages"]}
    cfg = next(c for c in config.load([])[1] if "backbone" in c.cfg["prior"]).cfg
    dom = cfg["eval"]["domain"]
    w, side = dom["width"], 32 - 2 * dom["shift"]
    macs = 9 * (side ** 2 * (1 * w + w * w) + (side // 2) ** 2 * (w * 2 * w + 4 * w * w)
                + (side // 4) ** 2 * (2 * w * 4 * w + 16 * w * w))
    macs += 4 * w * (side // 8) ** 2 * dom["feature_dim"] + dom["feature_dim"] * 10
    assert rows["domain_detector"]["flops"] == 3 * 2 * macs * dom["batch_size"] * dom["steps"]
    bb = cfg["prior"]["backbone"]
    mae = MAE(img_size=32, **(bb.get("arch") or {}))
    analytic = mae_flops_per_image(mae, bb["train"]["mask_ratio"]) * bb["train"]["batch_size"] * bb["train"]["steps"]
    assert rows["ssl_backbone"]["flops"] == pytest.approx(analytic, rel=0.15)
    # The eval stages now count the domain classifier's passes too.
    assert "domain classifier" in rows["fid_ref"]["what"] and "domain" in rows["recon_eval"]["what"]
    # With the stage-1 design the MAE cell's tokenizer is the MAE backbone + MLP (the conv encoder
    # was counted before): its latent cache costs several times the conv cells'.
    by_cell = {}
    for r in _plan_json(tmp_path)["stages"]:
        if r["stage"] == "latent_cache":
            by_cell[r["cells"][0].split("/")[0]] = r["flops"]
    assert by_cell["offline-mae"] > 3 * by_cell["gaussian"]


def test_dm_phase_counts_one_fake_update_per_iteration_and_a_tokenizer_step_every_kth(tmp_path):
    """TokenizerRun.iteration: every DM iteration updates the fake once; every vae_train_every-th
    is a tokenizer step (the others only encode). So a larger vae_train_every costs less (the old
    model counted k fake updates per iteration, which made it cost more), and at k = 1 the stage
    is every iteration's tokenizer step plus one fake update and the two loss forwards."""
    def tokenizer_cost(k: int, root) -> float:
        over = ["grid=single", "prior=gaussian", "loss=dm", f"loss.vae_train_every={k}", f"run_root={root}"]
        _, _, order, _, _ = grid.prepare(over)
        node = next(n for n in order if n.stage == "tokenizer")
        return plan.stage_cost(node, fl).flops, node.cfg
    fl = plan.SampleFlops()
    c1, cfg = tokenizer_cost(1, tmp_path / "a")
    c5, _ = tokenizer_cost(5, tmp_path / "b")
    assert c5 < c1
    tc = cfg["tokenizer"]
    enc, dec = fl.tokenizer(cfg)
    sn, bs = fl.score_net(cfg), tc["batch_size"]
    # N(0, I) gets no DM CFG: one fake and one teacher forward per tokenizer step. The decoder
    # fine-tune runs the (frozen) encoder forward only; cpu-tiny's warm-up trains the encoder.
    assert not tc["warmup_frozen_encoder"]
    full = 3 * (enc + dec) * (tc["warmup_iters"] + tc["match_iters"]) + (enc + 3 * dec) * tc["finetune_iters"]
    assert c1 == pytest.approx(bs * (full + sn * 5 * tc["match_iters"]))
