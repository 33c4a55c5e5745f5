"""Timing and memory helpers shared by the benchmark scripts in this folder (run as scripts, so they import
this file as a top-level module from their own directory)."""
from __future__ import annotations

import resource
import statistics
import time


def rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one warm-up call (which also fills caches)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
