"""Is the dm gradient signal or noise? Measured with q = p_ref, where the true gradient is 0,
against the exact gradient of a 1.5x scale mismatch on N(0, I), with the presets' own settings:
the teacher stage (to its plateau) on N(0, I), and the fake built by the dm loss from the dm and
cpu-tiny presets, trained on q = p_ref as the DM phase trains it. benchmark/dm_fidelity.py holds
the measurement; the README quotes its numbers.
"""
import pytest
import torch

from benchmark import dm_fidelity as fid

SHAPE, NCLS = (4, 8, 8), 10

pytestmark = [pytest.mark.slow, pytest.mark.measurement]  # ~10 min: `make test-all`


@pytest.fixture(scope="module")
def preset_teacher(tmp_path_factory):
    """The teacher stage as the cpu-tiny presets run it, on N(0, I)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = fid.preset_config()
    net, record = fid.train_teacher(cfg, tmp_path_factory.mktemp("fidelity"))
    yield net, record, cfg
    torch.set_num_threads(n)


def _noise(loss) -> float:
    return fid.direction_rms(loss, lambda m, g: torch.randn(m, *SHAPE, generator=g), NCLS)


def test_teacher_trains_to_its_plateau(preset_teacher):
    _, record, cfg = preset_teacher
    assert record["teacher_stopped"] == "plateau", record
    assert record["teacher_lr_decays"] == cfg["loss"]["teacher_plateau"]["decays"]


def test_exact_teacher_pretrained_fake_is_signal_not_noise(preset_teacher):
    """gaussian / gmm cells: the exact score is the teacher and the fake starts the DM phase as
    the network pre-trained on p_ref: the spurious gradient is at most a tenth of the
    1.5x-mismatch signal (measured 0.098). A fake from random weights, as before, is noise
    larger than the signal."""
    net, _, cfg = preset_teacher
    signal = fid.mismatch_signal(SHAPE, NCLS)
    pretrained = fid.fake_after(cfg, {"fake_init": net}, 0)
    assert pretrained.fake_init == "pretrained"
    assert _noise(pretrained) <= 0.1 * signal, (_noise(pretrained), signal)
    scratch = fid.fake_after(cfg, {}, 0)
    assert scratch.fake_init == "random" and _noise(scratch) > signal


def test_trained_teacher_fake_copy_drift_is_bounded(preset_teacher):
    """Feature priors: the fake is a copy of the trained teacher; after the DM phase's fake
    steps on q = p_ref at the preset's rate (3e-4) the gradient between the two networks is
    the fake's Adam jitter: measured 0.17 of the 1.5x-mismatch signal, bounded here at 0.25.
    The issue's target of 0.1 is NOT met at this rate (0.13 at 1e-4, 0.25 at 1e-3, README)."""
    net, _, cfg = preset_teacher
    signal = fid.mismatch_signal(SHAPE, NCLS)
    loss = fid.fake_after(cfg, {"teacher": net}, int(cfg["tokenizer"]["match_iters"]))
    assert loss.fake_init == "teacher" and loss.fake_lr == cfg["tokenizer"]["match_lr"]
    assert _noise(loss) <= 0.25 * signal, (_noise(loss), signal)
