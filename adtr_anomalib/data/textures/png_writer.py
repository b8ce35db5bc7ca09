"""Threaded PNG writing for the built-in textures: equal pixels give equal bytes."""

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

# Fast zlib level: noisy photos barely compress better at higher levels, but encode several times slower.
_PNG_OPTIONS: dict[str, Any] = {"format": "PNG", "compress_level": 1}


class PngWriter:
    """Encode PNGs on a few threads while the caller keeps rendering; zlib releases the GIL, so this scales.

    At most a few images wait in the queue, which bounds memory for large datasets. Leaving the ``with`` block
    waits for every write and re-raises the first error. File contents do not depend on the thread that wrote them.
    """

    def __init__(self) -> None:
        self._workers = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="adtr-png")
        self._pending: deque[Future[None]] = deque()

    def write(self, pixels: NDArray[np.uint8], path: Path) -> None:
        """Queue ``pixels`` (H x W grayscale or H x W x 3 RGB) to be saved as a PNG at ``path``.

        Args:
            pixels: The 8-bit image.
            path: Destination file; written later, on a worker thread.
        """
        while len(self._pending) >= 2 * self._workers:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_save_png, pixels, path))

    def __enter__(self) -> "PngWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _save_png(pixels: NDArray[np.uint8], path: Path) -> None:
    """Write one PNG; Pillow adds no timestamps, so equal pixels give equal bytes."""
    Image.fromarray(pixels).save(path, **_PNG_OPTIONS)


# --------------------------------------------------------------------------------------------------------------------
# Normal samples
# --------------------------------------------------------------------------------------------------------------------
