"""Training stages report while they run, without a terminal: log lines every N steps,
progress.json for benchmark.status, TensorBoard events; device-hours add up over attempts."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from benchmark.monitor import Ledger, TrainMonitor, fmt_duration, log_every, progress_of
from benchmark.training import Checkpoint, train_steps


def test_train_steps_logs_progress_and_tensorboard(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("DMVAE_LOG_EVERY", "2")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with caplog.at_level(logging.INFO, logger="benchmark.monitor"):
        train_steps("teacher", net, opt, None, torch.Generator().manual_seed(0), Checkpoint(tmp_path / "ckpt.pt", 0),
                    5, lambda step: torch.nn.functional.mse_loss(net(x), y))
    lines = [r.getMessage() for r in caplog.records if r.name == "benchmark.monitor"]
    # steps 2 and 4, and the last step (5) whatever the interval
    assert [ln.split(" | ")[0] for ln in lines] == ["teacher step 2/5 (40.0%)", "teacher step 4/5 (80.0%)",
                                                    "teacher step 5/5 (100.0%)"]
    assert all("lr 0.1" in ln and "grad " in ln and "ETA" in ln for ln in lines)
    prog = progress_of(tmp_path)
    assert (prog["stage"], prog["step"], prog["total"]) == ("teacher", 5, 5) and prog["eta_s"] == 0
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("teacher/loss")] == [2, 4, 5]


def test_ledger_sums_device_time_over_attempts(tmp_path):
    led = Ledger(tmp_path)
    led.begin(devices=8, device="cuda")
    time.sleep(0.2)
    led.beat()
    first = led.device_hours()
    assert first == pytest.approx(8 * 0.2 / 3600, rel=0.5)
    led.begin(devices=8, device="cuda")  # a requeue: the first attempt's time is kept
    time.sleep(0.1)
    led.beat()
    assert led.attempts() == 2 and led.device_hours() > first


def test_monitor_quiet_on_other_ranks(tmp_path, caplog):
    mon = TrainMonitor("generator", tmp_path, total=4, is_main=False, every=1)
    with caplog.at_level(logging.INFO, logger="benchmark.monitor"):
        for s in range(1, 5):
            mon.step(s, 1.0, items=8)
    assert not caplog.records and progress_of(tmp_path) is None and not (tmp_path / "tb").exists()


def test_bad_interval_is_rejected(monkeypatch):
    monkeypatch.setenv("DMVAE_LOG_EVERY", "often")
    with pytest.raises(ValueError, match="DMVAE_LOG_EVERY"):
        log_every()
    assert fmt_duration(3725) == "1h02m" and fmt_duration(65) == "1m05s"


def test_status_shows_step_and_eta_of_a_running_stage(tmp_path):
    from benchmark import grid, status
    from benchmark.store import write_json
    _, _, order, _, sweep = grid.prepare([f"run_root={tmp_path}", "grid=single", "prior=gaussian", "loss=kl"])
    gen = next(n for n in order if n.stage == "generator")
    mon = TrainMonitor("generator", gen.dir, total=400, start=0, every=100)
    mon.step(100, 0.5, items=12800)
    mon.close()
    tok = next(n for n in order if n.stage == "tokenizer")
    write_json(tok.record_path, {"facts": {}, "device_hours": 0.25, "attempts": 3})
    st = status.collect(sweep)
    assert st["nodes"][gen.key]["state"] == "running"
    text = status.render(st)
    assert "step 100/400, ETA" in text and "0.25 device-h over 3 attempt(s)" in text


def test_record_counts_every_attempt(tiny_overrides):
    """A stage that ran before (killed, requeued) reports the time of all its attempts."""
    from benchmark import grid
    from benchmark.launch import run_node
    _, _, order, _, _ = grid.prepare([*tiny_overrides, "prior=gaussian", "loss=kl"])
    ref = next(n for n in order if n.stage == "reference")
    ref.dir.mkdir(parents=True)
    earlier = Ledger(ref.dir)
    earlier.begin(devices=2, device="cpu")  # an attempt on 2 processes that died after 0.3 s
    time.sleep(0.3)
    earlier.beat()
    rec = run_node(ref)
    assert rec["attempts"] == 2
    assert rec["device_hours"] >= 2 * 0.3 / 3600 + rec["wall_time_s"] / 3600 * 0.9
