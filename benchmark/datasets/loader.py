"""Streaming a file-backed set for training: a sharded, resumable epoch order and a DataLoader.

Order: epoch ``e`` is a permutation of the set drawn from a generator seeded by (seed, e), so
it changes every epoch and is the same on every rank and after a restart. It is cut into
``len // global_batch`` global batches (the remainder is dropped, so every rank steps the same
number of times); rank ``r`` of ``W`` decodes rows ``[r * B/W, (r+1) * B/W)`` of each global
batch, so the ranks' shards partition the epoch, and a gathered global batch is the ranks'
rows in rank order (what the tokenizer stage's gather_rows builds). Labels of the whole global
batch come from the label tensor without decoding anything: batch-level matching losses need them.

Horizontal flips (``hflip``, training only; PAPER_SCALE.md: "Training adds a random horizontal
flip") are drawn with the permutation, so a resumed run flips the same images.

Resume: ``state_dict()`` holds the epoch and the number of global batches already *delivered*
(not prefetched by workers) in it; ``load_state_dict`` restarts the order there.

Memory: workers decode one rank-batch each, ``prefetch`` batches ahead, so the images in flight
are at most workers x prefetch x B/W; the per-process index (paths, labels, one epoch's
permutation) is ~70 bytes per image and no image is ever held beyond its batch.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


class ShardSampler:
    """The epoch order of one rank (see the module docstring), with the consumer's position."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 hflip: bool = False) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide over {world_size} ranks")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.global_batch, self.rank, self.world_size = int(n), int(global_batch), int(rank), int(world_size)
        self.seed, self.hflip = int(seed), bool(hflip)
        self.local = self.global_batch // self.world_size
        self.steps_per_epoch = self.n // self.global_batch
        self.epoch = self.position = 0
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation [n], flips [n] bool) of ``epoch``; the last epoch's is cached."""
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            perm = torch.randperm(self.n, generator=g)
            flips = torch.rand(self.n, generator=g) < 0.5 if self.hflip else torch.zeros(self.n, dtype=torch.bool)
            self._cache = (epoch, perm, flips)
        return self._cache[1], self._cache[2]

    def global_rows(self, epoch: int, k: int) -> torch.Tensor:
        """Rows of global batch ``k`` of ``epoch``, [world_size, B/W]: row r is rank r's share."""
        perm, _ = self.order(epoch)
        return perm[k * self.global_batch:(k + 1) * self.global_batch].view(self.world_size, self.local)

    def rank_items(self, epoch: int, k: int) -> list[tuple[int, bool]]:
        """This rank's (row, flip) pairs of global batch ``k``."""
        _, flips = self.order(epoch)
        rows = self.global_rows(epoch, k)[self.rank]
        return [(int(r), bool(flips[r])) for r in rows]

    def epoch_rows(self, epoch: int) -> torch.Tensor:
        """Every row this rank reads in ``epoch``, in order (its shard)."""
        return torch.cat([self.global_rows(epoch, k)[self.rank] for k in range(self.steps_per_epoch)])

    def advance(self) -> None:
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "n", "global_batch"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: the data order cannot continue")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _EpochBatches:
    """The DataLoader's batch sampler: this rank's batches from the sampler's current position
    to the end of its current epoch (read when the DataLoader starts an iteration)."""

    def __init__(self, sampler: ShardSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        s = self.sampler
        epoch, start = s.epoch, s.position
        for k in range(start, s.steps_per_epoch):
            yield s.rank_items(epoch, k)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.sampler.position


class _Decoded(Dataset):
    """(row, flip) -> (uint8 CHW image, rows found bad), decoded in a worker process."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item: tuple[int, bool]):
        row, flip = item
        img, bad = self.ds.read(int(self.ds.base_rows([row])[0]))
        if flip:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), bad


def _collate(items):
    return torch.stack([x for x, _ in items]), [r for _, bad in items for r in bad]


class ShardedLoader:
    """``next()`` -> (this rank's uint8 images [B/W, 3, R, R], the global batch's labels [B]),
    forever, epoch after epoch, decoded by ``workers`` DataLoader processes (0 = in this one)."""

    def __init__(self, ds, sampler: ShardSampler, workers: int = 4, prefetch: int = 2,
                 pin_memory: bool = False) -> None:
        if len(ds) != sampler.n:
            raise ValueError(f"sampler is for {sampler.n} rows, the set has {len(ds)}")
        self.ds, self.sampler = ds, sampler
        extra = {"prefetch_factor": prefetch, "persistent_workers": True} if workers > 0 else {}
        # Its own generator: each new iterator draws a worker base seed, and from the global RNG
        # that draw would shift the training's random stream by how often iterators were made,
        # which differs between a straight run and a resumed one. (Decoding draws nothing.)
        self._loader = DataLoader(_Decoded(ds), batch_sampler=_EpochBatches(sampler), num_workers=workers,
                                  collate_fn=_collate, pin_memory=pin_memory, generator=torch.Generator(), **extra)
        self._it = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sampler
        if self._it is None:
            self._it = iter(self._loader)
        try:
            x, bad = next(self._it)
        except StopIteration:  # the epoch is over: the sampler already moved to the next one
            self._it = iter(self._loader)
            x, bad = next(self._it)
        if bad:
            self.ds.bad.add(bad)
        labels = self.ds.labels[s.global_rows(s.epoch, s.position).flatten()]
        s.advance()
        return x, labels

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "bad_rows": sorted(self.ds.bad.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.ds.bad.add(state.get("bad_rows", ()))
        self._it = None  # the next batch comes from the restored position
