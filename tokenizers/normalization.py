"""Scalar latent normalisation, written once by the tokenizer stage and read everywhere else.

The public DMVAE code trains the teacher with one mean/scale and runs the DM stage without it;
keeping the numbers in one file next to the tokenizer checkpoint removes that class of bug.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmark.store import read_json, write_json


@dataclass(frozen=True)
class LatentNorm:
    mean: float = 0.0
    scale: float = 1.0

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.mean

    @classmethod
    def fit(cls, z: torch.Tensor) -> "LatentNorm":
        mean = float(z.mean())
        scale = float(z.std())
        if not scale > 0:
            raise ValueError(f"latents have zero or non-finite spread (std={scale}): the encoder collapsed")
        return cls(mean, scale)

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "LatentNorm":
        return cls(**read_json(path))
