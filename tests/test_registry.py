import os
import subprocess
import sys
from pathlib import Path

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


# ---- entry points of every group, found through real package metadata (a dist-info directory
# on sys.path is what `pip install` leaves behind), in a fresh interpreter so that nothing this
# test session already imported or registered can make them pass.

EP_PLUGIN = '''
import torch
from torch import nn
from backbones import BACKBONES, FeatureBackbone
from priors import LOSSES
from priors.losses.base import MatchingLoss

@LOSSES.register("ep-l1-to-zero")
class L1ToZero(MatchingLoss):
    def forward(self, z, labels, step, posterior=None):
        loss = z.abs().mean()
        return loss, {"l1": float(loss.detach())}

@LOSSES.register("ep-legacy-group")
class LegacyGroupLoss(L1ToZero):
    pass

@BACKBONES.register("ep-avgpool")
class AvgPoolBackbone(FeatureBackbone):
    out_dim, weights_source = 3, "none"
    def __init__(self, input_size=16, **_):
        super().__init__(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.scale = nn.Parameter(torch.ones(1))
    def features(self, x):
        return nn.functional.avg_pool2d(x, 4) * self.scale
'''

ENTRY_POINTS = """
[dmvae_bench.losses]
l1 = ep_plugin_pkg
[dmvae_bench.losss]
legacy = ep_plugin_pkg
[dmvae_bench.backbones]
avgpool = ep_plugin_pkg
"""

EP_CHECK = '''
import torch
from backbones import BACKBONES
from priors import LOSSES
loss = LOSSES.get("ep-l1-to-zero")(weight=1.0)
value, _ = loss(torch.ones(2, 4), None, 0)
assert float(value) == 1.0
assert "ep-legacy-group" in LOSSES
net = BACKBONES.get("ep-avgpool")(input_size=16)
assert net(torch.rand(2, 3, 16, 16)).shape == (2, 3, 4, 4)
print("ok")
'''


def _dist(tmp_path, entry_points: str):
    (tmp_path / "ep_plugin_pkg.py").write_text(EP_PLUGIN)
    info = tmp_path / "ep_plugin_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def test_loss_and_backbone_entry_point_groups(tmp_path):
    env = _dist(tmp_path, ENTRY_POINTS)
    proc = subprocess.run([sys.executable, "-c", EP_CHECK], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # The old spelling of the loss group still loads, with a warning to rename it.
    assert "old entry-point group 'dmvae_bench.losss'" in proc.stderr


def test_broken_entry_point_names_itself(tmp_path):
    env = _dist(tmp_path, "[dmvae_bench.losses]\nbroken = ep_plugin_pkg_missing\n")
    code = "from priors import LOSSES\nLOSSES.get('dm')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode != 0
    assert "'broken'" in proc.stderr and "dmvae_bench.losses" in proc.stderr and "failed to import" in proc.stderr
