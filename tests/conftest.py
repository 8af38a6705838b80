"""Shared fixtures: a tiny-size override list that runs every stage in seconds."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads from oversubscribing when pytest runs subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = [
    "tokenizer.warmup_iters=6", "tokenizer.match_iters=10", "tokenizer.finetune_iters=4",
    "tokenizer.batch_size=16", "tokenizer.checkpoint_every=5", "tokenizer.norm_images=64",
    "tokenizer.encoder.ch=8", "tokenizer.decoder.ch=8",
    "generator.steps=8", "generator.batch_size=16", "generator.train_images=128",
    "generator.checkpoint_every=4",
    "eval.n_ref=20", "eval.n_samples=20", "eval.batch_size=20", "eval.sampler.steps=4",
    "eval.kid_subset_size=20", "eval.extra_detectors=[mobilenet_v2-imagenet]",
    # The domain detector at a few steps of a width-4 net; more domain samples than eval.n_samples,
    # so the continued draw of gen_eval runs too.
    "eval.bootstrap=10", "eval.domain.n_samples=30", "eval.domain.n_ref=20", "eval.domain.snapshot_n_samples=10",
    "eval.domain.kid_subset_size=10", "eval.domain.width=4", "eval.domain.feature_dim=16", "eval.domain.steps=4",
    "eval.domain.batch_size=16", "eval.domain.checkpoint_every=2",
    # Eager everywhere: the grid presets compile the DiTs (a cold compile costs ~40 s a graph on
    # this CPU); tests/test_compile_option.py tests the switches themselves.
    "generator.compile=false", "eval.compile=false", "tokenizer.compile=false", "?loss.compile=false",
    "++generator.model_args.hidden_size=32", "++generator.model_args.depth=1", "++generator.model_args.num_heads=2",
    # Sizes of plug-ins only some cells have (`?key=value` sets a key only where it exists): the
    # dm loss's score networks and teacher, feature priors' bank, stage 1 and offline MAE (also
    # under `prior.base` for the subset prior).
    "?loss.score_net_args={patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}",
    "?loss.teacher_steps=6", "?loss.teacher_batch_size=16",
    *[f"?{p}.{k}" for p in ("prior", "prior.base") for k in (
        "backbone.train.steps=4", "backbone.train.batch_size=16", "stage1.iters=3", "stage1.batch_size=8",
        "n_images=64")],
]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on the shared 2-core machine two OpenMP
    threads spin against other processes and ran such steps ~5x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"run_root={tmp_path / 'runs'}"]
