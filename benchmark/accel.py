"""Accelerator settings every stage gets on CUDA, and nothing on the CPU.

- TF32 matmuls and convolutions (fp32 work on tensor cores; the DMVAE release's train scripts
  turn it on, ``--tf32``), and cuDNN's autotuner for the fixed shapes of a training loop.
- Fused AdamW (one kernel for the whole parameter update instead of a loop over tensors).
- channels_last (NHWC) for the tokenizer's conv networks and the PatchGAN (``channels_last``).
bf16 autocast is each stage's own (its ``precision`` setting); torch.compile is per stage too
(``tokenizer.compile``, ``loss.compile`` for the teacher stage and the dm networks,
``generator.compile``, ``eval.compile`` for gen_eval's sampler), kept out of every stage key.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


def configure(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def adamw(params: Iterable[torch.nn.Parameter], device: torch.device | str | None = None,
          **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused on CUDA. On the CPU the default (foreach) implementation: it is the one every
    resume and 1-vs-N-process test of this suite checks bit for bit."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        kwargs.setdefault("fused", True)
    return torch.optim.AdamW(params, **kwargs)


def compile_in_place(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile ``module`` in place (``nn.Module.compile``): its state_dict keys stay the
    plain module's, so checkpoints and weight files load into eager modules.

    Static shapes (``dynamic=False``): a training loop has one batch shape per call site, and a
    new shape is a recompilation, not a switch to symbolic shapes. With automatic dynamic shapes,
    the second batch size a DiT saw (the dm fake: 64-row updates, then its guided forwards) made
    dynamo trace ``torch.rand(<symbolic batch>)`` in the label dropout, which it cannot run."""
    module.compile(dynamic=False)
    return module


def channels_last(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On CUDA, the NHWC layout for a convolutional network's weights (and so its activations:
    cuDNN follows the weights' layout), which its tensor-core convolutions use under bf16
    autocast without transposing every call (PyTorch's channels_last tutorial; the paper-scale
    tokenizer is a conv decoder and a PatchGAN). On the CPU nothing changes: the CPU presets'
    results and their bit-exact tests keep NCHW (the MobileNetV2 backbone converts itself, where
    the CPU gain was measured: README "torch.compile, per stage"). In place; returns ``module``."""
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module
