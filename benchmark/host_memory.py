"""The process's peak host memory (resident set), read one way for every record that reports it
(gen_eval's ``peak_rss_mb_rank0``, the ``peak_rss_mb`` of benchmark.perf, gpu_check on the CPU).

A bottom module: standard library only, so a stage can use it without importing the tools.
"""
from __future__ import annotations

import resource
import sys


def reset_peak_rss() -> None:
    """Start a new peak at the current resident set (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM), so that a later ``peak_rss_mb`` is the peak of what ran in between. Where that
    is not allowed the peak stays the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set in MiB since the process started or since ``reset_peak_rss``: VmHWM of
    /proc/self/status (kB), the one peak Linux lets a process reset; without /proc, getrusage's
    ru_maxrss (KiB on Linux, bytes on macOS), which is never reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2 ** 20 if sys.platform == "darwin" else maxrss / 1024
