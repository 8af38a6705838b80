"""One module per stage; each exposes ``run(node) -> dict`` of facts for the record."""
from importlib import import_module
from typing import Callable

from benchmark.dag import STAGES


def runner(stage: str) -> Callable:
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return import_module(f"benchmark.stages.{stage}").run
