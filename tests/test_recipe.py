"""The paper's recipe where the miniature used to cut it short: the DM stage starts from the
stage-1 model (feature priors), the fake network starts from a network trained on p_ref and
follows the tokenizer's optimiser recipe, DM CFG only where labels exist, the teacher trains to a
plateau, and the generator keeps EMA snapshots."""
import copy

import pytest
import torch
import yaml

from benchmark.conf import __file__ as conf_init
from generators import build_generator
from priors import PRIORS
from priors.losses.dm import DistributionMatching

CONF = __import__("pathlib").Path(conf_init).parent
SHAPE = (4, 8, 8)


def dm_section(**over) -> dict:
    cfg = yaml.safe_load((CONF / "loss" / "dm.yaml").read_text())
    cfg.pop("name")
    cfg["score_net_args"] = {"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2}
    cfg.update(over)
    return cfg


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator("Tiny", input_size=8, in_channels=4, num_classes=10, patch_size=2,
                           hidden_size=32, depth=1, num_heads=2)


OPTIM = {"lr": 3e-4, "warmup_steps": 7, "grad_clip": 0.5}


def test_fake_follows_the_tokenizer_recipe_and_starts_pretrained():
    gauss = PRIORS.get("gaussian")(latent_shape=SHAPE)
    net = tiny_net()
    loss = DistributionMatching.from_config(dm_section(), inputs={"fake_init": net}, prior=gauss,
                                            latent_shape=SHAPE, num_classes=10, tokenizer_optim=OPTIM)
    assert loss.teacher_kind == "exact" and loss.fake_init == "pretrained"
    assert all(torch.equal(a, b) for a, b in zip(loss.fake.state_dict().values(), net.state_dict().values()))
    assert loss.fake is not net  # a copy: training the fake must not move the pre-trained network
    assert loss.fake_lr == 3e-4 and loss.fake_grad_clip == 0.5
    # warm-up of 7 steps: the first step runs at 1/7 of the rate
    assert loss.fake_opt.param_groups[0]["lr"] == pytest.approx(3e-4 / 7)
    # N(0, I) ignores labels: DM CFG would scale only the fake's label signal, so it is off
    assert loss.cfg_scale == 1.0 and loss.describe()["dm_cfg"] == 1.0
    random_start = DistributionMatching.from_config(dm_section(), inputs={}, prior=gauss, latent_shape=SHAPE,
                                                    num_classes=10, tokenizer_optim=OPTIM)
    assert random_start.fake_init == "random"


def test_fake_clip_and_warmup_act_on_its_steps():
    loss = DistributionMatching(teacher=tiny_net(1), latent_shape=SHAPE, num_classes=10, fake_lr=1e-2,
                                fake_warmup_steps=4, fake_grad_clip=1e-6, score_net_args={})
    before = [p.detach().clone() for p in loss.fake.parameters()]
    loss.update(torch.randn(8, *SHAPE) * 50, torch.randint(10, (8,)), 0)
    # A clip of 1e-6 leaves an Adam step of about lr/4 per parameter whatever the loss, so the
    # largest move is bounded by the warmed-up rate (1e-2 / 4 = 2.5e-3) plus weight decay.
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(loss.fake.parameters(), before))
    assert 0 < moved <= 2.5e-3 * 1.01
    assert loss.fake_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 2 / 4)
    state = loss.extra_state()
    other = DistributionMatching(teacher=tiny_net(1), latent_shape=SHAPE, num_classes=10, fake_lr=1e-2,
                                 fake_warmup_steps=4, score_net_args={})
    other.load_extra_state(copy.deepcopy(state))
    assert other.fake_sched.last_epoch == loss.fake_sched.last_epoch == 1


def test_dm_cfg_applies_where_labels_exist():
    class Conditional:
        class_conditional = True
        classes = None
    loss = DistributionMatching.from_config(dm_section(), inputs={"teacher": tiny_net()}, prior=Conditional(),
                                            latent_shape=SHAPE, num_classes=10, tokenizer_optim=OPTIM)
    assert loss.cfg_scale == 5.0 and loss.fake_init == "teacher"

    class Subset(Conditional):
        classes = [0, 1]  # a class subset ignores requested labels
    loss = DistributionMatching.from_config(dm_section(), inputs={"teacher": tiny_net()}, prior=Subset(),
                                            latent_shape=SHAPE, num_classes=10, tokenizer_optim=OPTIM)
    assert loss.cfg_scale == 1.0


def test_dm_declares_the_fake_init_stage_only_for_exact_teachers():
    base = {"dataset": {"num_classes": 10}, "seed": 0}
    cfg = {**base, "prior": {"name": "gaussian"}, "loss": {"name": "dm", **dm_section()}}
    needs = DistributionMatching.upstream(cfg)
    assert list(needs) == ["fake_init"] and needs["fake_init"].stage == "teacher"
    cfg["loss"]["fake_init"] = "random"
    assert DistributionMatching.upstream(cfg) == {}
    cfg["loss"]["teacher"] = "trained"
    assert list(DistributionMatching.upstream(cfg)) == ["teacher"]
    cfg["loss"]["fake_init"] = "copy"
    with pytest.raises(ValueError, match="fake_init must be pretrained or random"):
        DistributionMatching.validate(cfg)


def test_plateau_stop_stops_after_patience_and_resumes():
    from benchmark.training import PlateauStop
    values = iter([1.0, 0.5, 0.4, 0.399, 0.398, 0.397, 0.2])
    mon = PlateauStop(lambda: next(values), eval_every=10, patience=3, min_rel_improvement=0.01)
    stops = [mon.after_step(s) for s in range(1, 61)]
    # evaluations at 10..60: 1.0, 0.5, 0.4 improve; 0.399, 0.398, 0.397 are < 1% better -> stop at 60
    assert stops.index(True) == 59 and mon.stopped_at == 60 and len(mon.curve) == 6
    again = PlateauStop(lambda: 0.0, eval_every=10, patience=3)
    state = PlateauStop(lambda: 0.0, eval_every=10, patience=3)
    vals = iter([1.0, 0.9995, 0.9994])
    state.evaluate = lambda: next(vals)
    for s in range(1, 31):
        state.after_step(s)
    again.load_state_dict(state.state_dict())
    assert again.bad == 2 and again.best == 1.0 and again.curve == state.curve
    again.evaluate = lambda: 0.9999
    assert again.after_step(40)  # the third evaluation without progress


def test_teacher_plateau_is_recorded(tmp_path, one_thread):
    """The teacher stage with a plateau rule stops before its ceiling on an easy target and
    writes the held-out curve."""
    from benchmark.dag import Node
    from benchmark.stages import teacher
    from benchmark.store import save_torch
    dataset = yaml.safe_load((CONF / "dataset" / "fashion_mnist.yaml").read_text())
    base = {"prior": {"name": "gaussian"}, "dataset": dataset,
            "tokenizer": {"encoder": {"name": "conv", "mult": [1, 2, 2]}, "latent_channels": 4}, "seed": 0,
            "device": "cpu"}
    ref = Node("reference", "reference-x", {}, {}, base, tmp_path)
    ref.dir.mkdir(parents=True)
    save_torch(ref.dir / "prior.pt", PRIORS.get("gaussian")(latent_shape=SHAPE).state_dict())
    loss = dm_section(teacher_steps=400, teacher_batch_size=32, teacher_lr=3e-3,
                      teacher_plateau={"eval_every": 20, "patience": 2, "min_rel_improvement": 0.2,
                                       "heldout": 256})
    node = Node("teacher", "teacher-x", {}, {"reference": ref}, {**base, "loss": loss}, tmp_path)
    node.dir.mkdir(parents=True)
    rec = teacher.run(node)
    curve = __import__("json").loads((node.dir / "teacher_curve.json").read_text())["step_heldout_fm"]
    assert rec["teacher_stopped"] == "plateau" and rec["teacher_steps_run"] < 400
    assert curve[-1][0] == rec["teacher_steps_run"] and len(curve) >= 3


def test_generator_keeps_ema_snapshots(tmp_path, one_thread):
    """ema_050.pt is the EMA after half the steps: the same weights as a run that stops there."""
    from benchmark.stages.generator import train
    from benchmark.store import load_torch
    gen = yaml.safe_load((CONF / "generator" / "cpu-tiny.yaml").read_text())
    gen.update(steps=4, batch_size=8, checkpoint_every=100, lr_warmup_steps=1, snapshots=[],
               model_args={"patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2})
    dataset = yaml.safe_load((CONF / "dataset" / "fashion_mnist.yaml").read_text())
    cfg = {"generator": gen, "seed": 0, "device": "cpu", "dataset": dataset,
           "tokenizer": {"encoder": {"name": "conv", "mult": [1, 2, 2]}, "latent_channels": 4}}
    z, y = torch.randn(32, *SHAPE), torch.randint(10, (32,))
    rec = train({**cfg, "generator": {**gen, "snapshots": [0.5]}}, z, y, tmp_path / "full")
    assert rec["ema_snapshots"] == [{"fraction": 0.5, "step": 2, "file": "ema_050.pt"}]
    half = train({**cfg, "generator": {**gen, "steps": 2}}, z, y, tmp_path / "half")
    assert half["ema_snapshots"] == []
    a, b = load_torch(tmp_path / "full" / "ema_050.pt"), load_torch(tmp_path / "half" / "ema.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="fractions must lie in"):
        train({**cfg, "generator": {**gen, "snapshots": [1.0]}}, z, y, tmp_path / "bad")


def test_stage1_tokenizer_starts_at_its_own_bank(one_thread):
    """tokenizer.design=stage1: the tokenizer rebuilt from the reference stage's stage-1 model
    encodes each bank image to its own bank entry (q = p_ref image by image at the first DM
    step) and decodes as stage 1's decoder does. Random backbone weights: kept in the state."""
    from benchmark.data import load_images, subset
    from priors import FitContext
    from tokenizers import build_tokenizer
    data = subset(load_images("fashion_mnist", "train", 32), 64, seed=0)
    prior = PRIORS.get("features")(latent_shape=SHAPE, n_images=40,
                                   backbone={"name": "mobilenet_v2", "pretrained": False, "input_size": 128},
                                   stage1={"iters": 3, "batch_size": 8,
                                           "decoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]}})
    prior.fit(FitContext(dataset=data, seed=0))
    state = prior.state_dict()
    fresh = PRIORS.get("features")(latent_shape=SHAPE, n_images=40,
                                   backbone={"name": "mobilenet_v2", "pretrained": False, "input_size": 128},
                                   stage1={"iters": 3, "batch_size": 8,
                                           "decoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]}})
    fresh.load_state_dict(state)  # as the tokenizer stage sees it: loaded from prior.pt
    arch = fresh.stage1_architecture(32)
    assert arch["encoder"]["name"] == "backbone" and arch["bottleneck_hidden"] == 2 * 96
    tok = build_tokenizer(arch, 32, 1, stochastic=False)
    tok.load_state_dict({**tok.state_dict(), **fresh.stage1_weights()})
    tok.eval()
    images = subset(data, 40, seed=0)
    with torch.no_grad():
        z = fresh.stage1_norm().normalize(tok.encode(images.float_batch(torch.arange(40))))
    assert torch.allclose(z, fresh.bank, atol=1e-4), float((z - fresh.bank).abs().max())
    # The backbone trains in the DM stage, its batch norms keep their statistics.
    tok.train()
    bns = [m for m in tok.encoder.bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and tok.decoder.training


def test_design_grid_keeps_the_two_designs_apart():
    """grid=design: the same prior under both tokenizer designs is two table rows, not two seeds
    of one row."""
    from benchmark import config
    _, cells = config.load(["grid=design"])
    rows = {(c.keys["prior"], c.keys["tokenizer"]) for c in cells}
    assert rows == {("offline-mae", "cpu-tiny"), ("offline-mae", "cpu-tiny (preset design)"),
                    ("mobilenet_v2-sup", "cpu-tiny"), ("mobilenet_v2-sup", "cpu-tiny (preset design)")}
    assert len(cells) == 8  # two seeds
