"""``adtr-anomalib benchmark``: ADTR, ADTR+, PaDiM and PatchCore side by side, on any anomalib datamodules.

Fairness rules: for each dataset and seed every model gets a fresh datamodule built the same way (same split),
the same input size and normalisation, the same backbone weights (loaded through ``load_backbone_weights``, so
the offline Lite0 weights work for all), the same metrics (``inspection_evaluator``) and the same throughput
test, in one process under the same allocator setting.

Run ``adtr-anomalib benchmark --help`` (or ``python -m adtr_anomalib.benchmark``); configs live in
``configs/benchmark/``. PatchCore needs ``MALLOC_MMAP_THRESHOLD_=1048576`` on small CPU machines (glibc heap
fragmentation); the command applies that setting to its own process (:func:`limit_heap_fragmentation`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Sequence

from adtr_anomalib.benchmark.models import METRICS, build_model
from adtr_anomalib.benchmark.report import markdown_table, write_csv

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter that MALLOC_MMAP_THRESHOLD_ sets at start-up

__all__ = [
    "MALLOC_ENV",
    "METRICS",
    "build_model",
    "cli",
    "limit_heap_fragmentation",
    "main",
    "markdown_table",
    "write_csv",
]


def limit_heap_fragmentation() -> bool:
    """glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` for this running process and the processes it starts.

    PatchCore's large, short-lived buffers otherwise fragment glibc's heap until a small machine runs out of memory
    (spec section 5). The variable alone acts only when a process starts; ``mallopt`` applies the same threshold
    now, so benchmarks need no re-execution of themselves. The variable is set too, for child processes.

    Returns:
        Whether the threshold was applied (``False`` where the C library is not glibc).
    """
    os.environ.update(MALLOC_ENV)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"])) == 1


def cli(argv: Sequence[str]) -> int:
    """Parse the options and run the benchmark in this process: 0 all jobs succeeded, 1 some failed, 2 bad input."""
    from jsonargparse import ArgumentError

    from adtr_anomalib.benchmark.plan import parser
    from adtr_anomalib.benchmark.run import run_benchmark

    try:
        options = parser()
        settings = options.parse_args(list(argv))
        return run_benchmark(settings, options.dump(settings))
    except (ArgumentError, ValueError, FileExistsError) as error:
        print(f"adtr-anomalib benchmark: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the allocator setting (:func:`limit_heap_fragmentation`), then :func:`cli`."""
    limit_heap_fragmentation()
    return cli(list(sys.argv[1:] if argv is None else argv))
