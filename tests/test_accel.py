"""benchmark/accel.py: what changes on CUDA and what stays as it is on the CPU."""
from __future__ import annotations

import torch

from benchmark.accel import adamw, channels_last
from tokenizers.losses import PatchGAN


def test_channels_last_converts_conv_weights_only_for_cuda():
    torch.manual_seed(0)
    gan = PatchGAN(3)
    w = gan.disc.model[0].weight if hasattr(gan.disc, "model") else next(gan.disc.parameters())
    assert w.dim() == 4 and w.is_contiguous()
    channels_last(gan.disc, torch.device("cpu"))  # the CPU keeps NCHW: its results stay bit-exact
    assert w.is_contiguous()
    x = torch.rand(2, 3, 32, 32)
    before = gan.disc(x)
    params = list(gan.disc.parameters())
    # The layout is the device's decision, not the tensors': a module on the CPU stands in here.
    channels_last(gan.disc, torch.device("cuda"))
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    # The same Parameter objects (an optimiser built before still steps them), the same values.
    assert all(a is b for a, b in zip(params, gan.disc.parameters()))
    torch.testing.assert_close(gan.disc(x), before, rtol=1e-5, atol=1e-5)


def test_adamw_is_fused_only_on_cuda():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert not adamw(p, torch.device("cpu"), lr=1e-3).defaults.get("fused")
    assert adamw(p, None, lr=1e-3).defaults.get("fused") in (None, False)
