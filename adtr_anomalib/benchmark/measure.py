"""What a benchmark measures besides accuracy, defined once: wall time, throughput and peak resident memory.

Written here because anomalib's timer callback times ``Engine.test`` as a whole (data loading and metrics included,
at the datamodule's batch size) and its benchmark pipeline measures neither throughput nor memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from adtr_anomalib.models.adtr.components.training import cpu_flags

T = TypeVar("T")

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter that MALLOC_MMAP_THRESHOLD_ sets at start-up


def limit_heap_fragmentation() -> bool:
    """glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` for this running process and the processes it starts.

    PatchCore's large, short-lived buffers otherwise fragment glibc's heap until a small machine runs out of memory.
    The variable alone acts only when a process starts; ``mallopt`` applies the same threshold
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


def heap_setting_for(models: Iterable[str]) -> bool:
    """:func:`limit_heap_fragmentation` when ``models`` include PatchCore, then for every model of the run alike.

    A run without PatchCore keeps glibc's default, which trains the other models faster.

    Returns:
        Whether PatchCore's setting was applied.
    """
    return "patchcore" in set(models) and limit_heap_fragmentation()


def allocator() -> str:
    """The allocator setting this process runs under, for reports."""
    return f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc default)')}"


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """Run ``call`` once.

    Returns:
        Its result and the wall-clock seconds it took.
    """
    began = time.perf_counter()
    result = call()
    return result, time.perf_counter() - began


def fastest_seconds(call: Callable[[], Any], min_calls: int = 3, min_seconds: float = 1.0) -> float:
    """Seconds of the fastest of repeated calls, after one warm-up call.

    The fastest counts (as ``timeit`` does): it filters out most of the time other processes take. Calls repeat
    until there were ``min_calls`` of them and they took ``min_seconds`` together.

    Args:
        call: One unit of work, e.g. one batch through a model.
        min_calls: Fewest timed calls.
        min_seconds: Least total time of the timed calls.

    Returns:
        The fastest call's seconds.
    """
    call()
    times: list[float] = []
    while len(times) < min_calls or sum(times) < min_seconds:
        times.append(timed(call)[1])
    return min(times)


def matmul_peak(dtype: torch.dtype, size: int = 2048, min_seconds: float = 3.0) -> float:
    """The machine's matrix-product speed in ``dtype``: GFLOP/s of the fastest ``size``-square product, the yardstick
    that model speeds are given as a share of.

    Args:
        dtype: ``torch.float32`` or ``torch.bfloat16``.
        size: Side of the square matrices.
        min_seconds: Least time spent on timed products.

    Returns:
        GFLOP/s.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size**3 / fastest_seconds(lambda: a @ b, min_calls=5, min_seconds=min_seconds) / 1e9


def fastest_interleaved(calls: Sequence[Callable[[], Any]], rounds: int = 12) -> list[float]:
    """Seconds of the fastest call of each of ``calls``, timed in turns after one warm-up call each.

    In turns, not one after the other: on a shared machine a busy spell then slows every call alike, so the
    ratios between them hold; timed in blocks, one runtime can get the quiet minute and another the busy one.

    Args:
        calls: Units of work to compare, e.g. one batch through each of several runtimes.
        rounds: Timed calls of each.

    Returns:
        The fastest call's seconds, for each of ``calls`` in order.
    """
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, spent in zip(calls, times, strict=True):
            spent.append(timed(call)[1])
    return [min(spent) for spent in times]


@dataclass
class PeakMemory:
    """Resident memory (MB) before a block and its peak while the block ran."""

    before_mb: float = math.nan
    peak_mb: float = math.nan

    @property
    def added_mb(self) -> float:
        """How much the block raised the peak above the memory already in use before it."""
        return self.peak_mb - self.before_mb


@contextlib.contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Measure the process's peak resident memory during the block.

    On Linux the kernel's high-water mark (``VmHWM``) is reset when the block starts, so the peak covers the block
    only and misses no short spike (a sampling thread would). Elsewhere it is the peak since the process started.
    """
    # /proc rather than psutil: only the kernel's files reset the high-water mark, and psutil reports no peak.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    memory = PeakMemory(before_mb=_resident_mb())
    try:
        yield memory
    finally:
        memory.peak_mb = _peak_mb()


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field in MB (Linux), else ``None``."""
    try:
        match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _resident_mb() -> float:
    value = _status_mb("VmRSS")
    return math.nan if value is None else value


def _peak_mb() -> float:
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def machine() -> str:
    """The machine in one line, for the report."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    if found := re.search(r"model name\s*:\s*(.+)", text):
        cpu = found.group(1).strip()
    # What decides bf16 and INT8 speed on a CPU (the matrix extensions OpenVINO and oneDNN use).
    flags = cpu_flags() or frozenset()
    extensions = [name for name in ("avx512_vnni", "avx512_bf16", "amx_tile") if name in flags]
    if text:
        cpu += f"; {', '.join(extensions) or 'no AVX-512 VNNI/BF16 or AMX'}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {gpu}; torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{allocator()}"
    )


def provenance() -> dict[str, str]:
    """Where a row of results comes from: UTC date, git commit, machine and the command that wrote it.

    The commit gets ``+changes`` when tracked code or configs differ from it (results files and docs do not
    count): the row then comes from code that no commit holds.
    """
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    code = ["*.py", "*.ipynb", "pyproject.toml", "configs"]
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", *code],
        capture_output=True,
        text=True,
        check=False,
    )
    stamp = commit.stdout.strip() or "unknown"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": f"{stamp}+changes" if stamp != "unknown" and changed.stdout.strip() else stamp,
        "machine": machine(),
        "command": shlex.join(["python", *sys.argv]),
    }
