"""``adtr-anomalib benchmark``: ADTR, ADTR+, PaDiM and PatchCore side by side, on any anomalib datamodules.

Fairness rules: for each dataset and seed every model gets a fresh datamodule built the same way (same split),
the same input size and normalisation, the same backbone weights (loaded through ``load_backbone_weights``, so
the offline Lite0 weights work for all), the same metrics (``inspection_evaluator``) and the same throughput
test, in one process under the same allocator setting: PatchCore's (below) when the run has PatchCore, else
glibc's default.

Run ``adtr-anomalib benchmark --help`` (or ``python -m adtr_anomalib.benchmark``); configs live in
``configs/benchmark/``. PatchCore needs ``MALLOC_MMAP_THRESHOLD_=1048576`` on small CPU machines (glibc heap
fragmentation); a run with PatchCore applies that setting to its own process (:func:`limit_heap_fragmentation`).
Runs without PatchCore keep glibc's default, because the setting slows the training of the other models.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from adtr_anomalib.benchmark.measure import MALLOC_ENV, heap_setting_for, limit_heap_fragmentation
from adtr_anomalib.benchmark.models import METRICS, build_model
from adtr_anomalib.benchmark.report import markdown_table, write_csv

__all__ = [
    "MALLOC_ENV",
    "METRICS",
    "build_model",
    "cli",
    "heap_setting_for",
    "limit_heap_fragmentation",
    "main",
    "markdown_table",
    "write_csv",
]


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
    """Entry point (``adtr-anomalib benchmark``): :func:`cli` on the command line's arguments."""
    return cli(list(sys.argv[1:] if argv is None else argv))
