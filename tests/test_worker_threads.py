"""The local launcher's worker processes: torch threads and numpy's BLAS threads both follow
``threads_per_worker`` (an unbounded OpenBLAS pool oversubscribed the 2-core machine)."""
from __future__ import annotations

import multiprocessing as mp

from benchmark.launch import _worker_init


def _pools() -> tuple[int, list[int]]:
    import torch
    from threadpoolctl import threadpool_info
    import numpy  # noqa: F401  (loads OpenBLAS, as the metrics do)
    return torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_worker_limits_torch_and_blas_threads():
    ctx = mp.get_context("spawn")  # as the launcher starts its workers
    with ctx.Pool(1, initializer=_worker_init, initargs=(1,)) as pool:
        torch_threads, blas = pool.apply(_pools)
    assert torch_threads == 1
    assert blas and all(n == 1 for n in blas), blas
