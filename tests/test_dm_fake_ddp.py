"""The dm fake network's data-parallel step (issue #15): with N processes each rank trains the
fake on its own rows of the global batch, with that batch's noise / t / label-dropout draws, and
the gradients are averaged over ranks (priors.losses.base.average_gradients).

Checked here: the rows path draws exactly what one process draws (bitwise, RNG left in the same
state); 2 gloo processes (torchrun) end with the same fake and optimiser state on both ranks
(bitwise: what rank 0 checkpoints is what every rank holds), within a stated tolerance of one
process on the same global batches, and a run interrupted and resumed from the checkpointed state
(fake weights, extra_state, RNG) ends bit-identical to the uninterrupted one. The tokenizer stage
end to end (fp32 and bf16) is tests/test_tokenizer_distributed.py.

Run as a script under torchrun, this file is the worker (one per rank).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from _launch import launch
from generators import build_generator, flow_matching_loss
from priors.losses.dm import DistributionMatching

log = logging.getLogger(__name__)

BATCH, SHAPE, CLASSES, STEPS, RESUME_AT = 32, (4, 8, 8), 10, 8, 4
# Measured on the 2-core machine (fp32, 8 steps of AdamW at lr 1e-3, clip 1.0, warm-up 2), 2
# processes vs 1: the fake's velocities on fixed inputs differ by 2.2e-7 relative (max |diff| /
# max |v|), its weights by 4.3e-6 (largest in the attention biases and the adaLN weights, which
# start at 0 and are still ~5e-3 after 8 steps, so AdamW's normalised steps turn rounding into a
# visible relative change) and the logged loss by 9.1e-8: two half-batch backward passes plus the
# all-reduce differ from one full-batch pass only in the order of float sums. Without the
# all-reduce (each rank stepping on its own half) outputs differ by 0.24 and weights by 1.7, so
# the bounds (outputs and loss ~45x, weights ~23x above what was measured) still catch a missing
# or wrong average by four orders of magnitude.
OUTPUT_TOL, WEIGHT_TOL, LOSS_TOL = 1e-5, 1e-4, 1e-5


def _build() -> DistributionMatching:
    torch.manual_seed(0)
    teacher = build_generator("Tiny", input_size=SHAPE[1], in_channels=SHAPE[0], num_classes=CLASSES)
    return DistributionMatching(1.0, teacher=teacher, latent_shape=SHAPE, num_classes=CLASSES, fake_lr=1e-3,
                                fake_warmup_steps=2, fake_grad_clip=1.0)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # Shifted and scaled from N(0, I), so that the fake (a copy of a random teacher) has
    # something to learn and its gradients are not float noise.
    return [(1.3 * torch.randn(BATCH, *SHAPE, generator=g) + 0.2, torch.randint(0, CLASSES, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _train(dm: DistributionMatching, rows: slice | None, start: int, stop: int) -> list[float]:
    """Steps start..stop-1 on the fixed global batches; this process's rows of each if given."""
    out = []
    for k, (z, y) in enumerate(_batches()[start:stop], start):
        out.append(dm.update(z if rows is None else z[rows], y, k, rows=rows)["fake_fm"])
    return out


def _state(dm: DistributionMatching) -> dict:
    return {"fake": {k: v.clone() for k, v in dm.fake.state_dict().items()}, "extra": dm.extra_state()}


def _tensors(obj) -> list:
    """Every leaf of a (nested) state, in a fixed order, for exact comparison."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _tensors(v)]
    return [obj]


def _identical(a, b) -> bool:
    la, lb = _tensors(a), _tensors(b)
    return len(la) == len(lb) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                      for x, y in zip(la, lb))


def _velocities(fake_state: dict) -> torch.Tensor:
    """The fake as a function: its velocities (eval mode) at fixed inputs."""
    fake = _build().fake
    fake.load_state_dict(fake_state)
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(16, *SHAPE, generator=g), torch.rand(16, generator=g)
    with torch.no_grad():
        return fake.eval()(x, t, torch.randint(0, CLASSES, (16,), generator=g))


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)


def worker(out_dir: Path) -> None:
    """One rank: an uninterrupted run, then one interrupted at RESUME_AT and resumed from what a
    checkpoint holds (fake weights, extra_state, torch RNG), as the tokenizer stage saves it."""
    from benchmark import distributed
    info = distributed.init_from_env("cpu")
    n = BATCH // info.world_size
    rows = slice(info.rank * n, (info.rank + 1) * n)
    dm = _build()
    torch.manual_seed(2)
    logs = _train(dm, rows, 0, STEPS)
    full = _state(dm)

    dm = _build()
    torch.manual_seed(2)
    _train(dm, rows, 0, RESUME_AT)
    ckpt = out_dir / f"ckpt{info.rank}.pt"
    torch.save({**_state(dm), "rng": torch.get_rng_state()}, ckpt)
    dm = _build()  # a fresh process's loss, then the checkpoint's state
    saved = torch.load(ckpt, weights_only=True)
    dm.fake.load_state_dict(saved["fake"])
    dm.load_extra_state(saved["extra"])
    torch.set_rng_state(saved["rng"])
    _train(dm, rows, RESUME_AT, STEPS)
    torch.save({"full": full, "resumed": _state(dm), "logs": logs}, out_dir / f"rank{info.rank}.pt")
    distributed.finish()  # as run_stage does: both ranks done before either tears the group down


def test_rows_path_draws_what_one_process_draws():
    """rows covering the whole batch through the rows path == flow_matching_loss, bitwise, with
    the same gradients and the RNG left in the same state (so every later draw is unchanged)."""
    dm = _build()
    plain = _build().fake.train()
    z, y = _batches()[0]
    torch.manual_seed(5)
    ref = flow_matching_loss(plain, z, y)
    ref.backward()
    ref_rng = torch.get_rng_state()
    torch.manual_seed(5)
    got = dm.rows_loss(z, y, slice(0, BATCH))
    got.backward()
    assert torch.equal(ref, got)
    assert torch.equal(ref_rng, torch.get_rng_state())
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), dm.fake.parameters()))
    assert dm.fake.training  # back in training mode after the rows path's eval-mode forward


def test_rows_without_process_group_is_an_error():
    dm = _build()
    z, y = _batches()[0]
    with pytest.raises(RuntimeError, match="no process group"):
        dm.update(z[: BATCH // 2], y, 0, rows=slice(0, BATCH // 2))


@pytest.mark.slow  # ~25 s on the 2-core machine (torchrun start-up, 3 x 8 steps per rank)
def test_two_processes_match_one_process(tmp_path):
    launch(str(Path(__file__).resolve()), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Every rank holds exactly what rank 0 checkpoints: weights, AdamW moments, scheduler.
    assert _identical(r0["full"], r1["full"])
    assert r0["logs"] == r1["logs"]
    # Resuming from the checkpointed state continues bit for bit.
    assert _identical(r0["full"], r0["resumed"]) and _identical(r1["full"], r1["resumed"])

    dm = _build()
    torch.manual_seed(2)
    logs = _train(dm, None, 0, STEPS)
    one = _state(dm)["fake"]
    va, vb = _velocities(one), _velocities(r0["full"]["fake"])
    outputs = float((va - vb).abs().max() / va.abs().max())
    weights = _rel(one, r0["full"]["fake"])
    loss = max(abs(a - b) / abs(a) for a, b in zip(logs, r0["logs"]))
    log.info("dm fake, 2 processes vs 1: outputs %.2e, weights %.2e, loss %.2e (relative)", outputs, weights, loss)
    assert outputs <= OUTPUT_TOL and weights <= WEIGHT_TOL and loss <= LOSS_TOL, (outputs, weights, loss)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
