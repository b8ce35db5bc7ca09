"""Reading checkpoints: a file that is no checkpoint is refused with its name before torch reads it."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO


def check_checkpoint_file(path: str | Path | None) -> None:
    """Refuse a local file that is no torch checkpoint, naming it.

    ``torch.load`` on, say, a text file answers with advice to retry with ``weights_only=False``, which is unsafe
    and would not help. Checkpoints are zip archives (``torch.save`` since torch 1.6) or legacy pickles (first
    byte 0x80); anything else is refused here. Missing and remote paths are left to Lightning.
    """
    if path is None or not Path(path).is_file():
        return
    with Path(path).open("rb") as handle:
        first = handle.read(1)
    if zipfile.is_zipfile(path) or first == b"\x80":
        return
    msg = (
        f"ckpt_path '{path}' is not a checkpoint (not a file written by torch.save). Give the .ckpt file that "
        "training wrote, e.g. results/ADTR/<data>/<category>/latest/weights/lightning/model.ckpt."
    )
    raise ValueError(msg)


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, with :func:`check_checkpoint_file` before every read.

    ADTR and ADTR+ hand it to the Trainer (``trainer_arguments``), so ``--ckpt_path`` of ``test``, ``predict``,
    ``validate`` and a resumed ``fit`` is checked before Lightning's ``torch.load``.
    """

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Check the file, then read it as Lightning does."""
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


# One stateless instance for every Trainer: anomalib rebuilds its Trainer when a model's trainer_arguments change,
# and a new instance per call would count as a change.
CHECKPOINT_IO = CheckedCheckpointIO()
