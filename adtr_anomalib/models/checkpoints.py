"""Checkpoint compatibility of ADTR and ADTR+, in one place.

- a file that is no checkpoint is refused with its name before torch reads it;
- the random number generators are saved and restored, so a resumed run continues exactly;
- a checkpoint defines the network it was trained with, and loads whatever evaluator it was saved with;
- checkpoints from before the feature and map statistics load with identity statistics.
"""

from __future__ import annotations

import logging
import random
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

logger = logging.getLogger(__name__)

# Checkpoint entry holding the random number generators' state, so a resumed run continues exactly.
RNG_STATE_KEY = "adtr_rng_state"


def check_checkpoint_file(path: str | Path | None) -> None:
    """Refuse a local file that is no torch checkpoint, naming it.

    ``torch.load`` on, say, a text file answers with advice to retry with ``weights_only=False``, which is unsafe
    and would not help. Checkpoints are zip archives (``torch.save`` since torch 1.6) or legacy pickles (first
    byte 0x80); anything else is refused here. Missing and remote paths are left to Lightning.

    Args:
        path: The ``ckpt_path`` given; ``None`` passes.

    Raises:
        ValueError: If ``path`` is an existing file that is neither a zip archive nor a pickle.
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
        """Check the file, then read it as Lightning does.

        Args:
            path: The checkpoint file.
            map_location: Passed to ``torch.load``; the default keeps the tensors on the CPU.
            weights_only: Passed to ``torch.load``.

        Returns:
            The checkpoint dictionary.
        """
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


# One stateless instance for every Trainer: anomalib rebuilds its Trainer when a model's trainer_arguments change,
# and a new instance per call would count as a change.
CHECKPOINT_IO = CheckedCheckpointIO()


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python random states, in types ``torch.load(weights_only=True)`` reads.

    Returns:
        The states by generator (``torch``, ``numpy``, ``python``, and ``cuda`` once CUDA is in use).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved.

    Args:
        state: The dictionary :func:`rng_state` returned; CUDA states only apply on as many devices.
    """
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """Tuples and lists compare equal (hyper-parameters come back from checkpoints as lists).

    Args:
        value: A hyper-parameter value.

    Returns:
        ``value`` as a list if it is a tuple or list, otherwise unchanged.
    """
    return list(value) if isinstance(value, tuple | list) else value


def adopt_network_arguments(checkpoint: dict[str, Any], hparams: Any, names: Iterable[str], owner: str) -> bool:
    """Take the network's arguments ``names`` from the checkpoint into ``hparams`` where they differ.

    ``anomalib predict/test --model ADTR --ckpt_path ...`` builds ADTR from its defaults (EfficientNet-B4),
    then Lightning loads the checkpoint into it; a model trained with another backbone or size would fail
    the state-dict load. The checkpoint defines the network, so its arguments win.

    Args:
        checkpoint: The Lightning checkpoint being loaded.
        hparams: The module's hyper-parameters; updated in place.
        names: Hyper-parameters that define the network.
        owner: Name of the model, for the log message.

    Returns:
        Whether any argument changed (the network must then be rebuilt).
    """
    saved = checkpoint.get("hyper_parameters") or {}
    changed = {k: saved[k] for k in names if k in saved and plain(saved[k]) != plain(hparams[k])}
    if changed:
        logger.info("%s: network arguments taken from the checkpoint: %s", owner, changed)
        hparams.update(changed)
    return bool(changed)


def match_evaluator_state(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Let a checkpoint load whatever evaluator it was trained with.

    The evaluator is not a hyper-parameter, so ``load_from_checkpoint`` (and ``anomalib export/predict
    --ckpt_path``) builds the default one; a model trained with other metrics (e.g. AUPRO, whose
    ``fpr_limit`` is a saved buffer) would then fail the strict state-dict load. Metric buffers carry no
    learned state, so the module's own evaluator values replace the saved ones.

    Args:
        checkpoint: The Lightning checkpoint being loaded; its ``state_dict`` is changed in place.
        module: The Lightning module it loads into.
    """
    saved = checkpoint.get("state_dict")
    if saved is None:
        return
    current = {key: value for key, value in module.state_dict().items() if key.startswith("evaluator.")}
    for key in [key for key in saved if key.startswith("evaluator.") and key not in current]:
        del saved[key]
    for key, value in current.items():
        saved.setdefault(key, value)


def fill_statistics(checkpoint: dict[str, Any], model: nn.Module, names: Iterable[str], prefix: str = "model.") -> None:
    """Checkpoints from before ``normalize_features``/``normalize_map`` lack their statistics: they load as identity.

    Args:
        checkpoint: A Lightning checkpoint (its ``state_dict``) or a plain state dict when ``prefix`` is empty.
        model: The ``ADTRModel`` whose current (identity) statistics fill the gaps.
        names: The statistics' buffer names.
        prefix: Prefix of the model's keys in the state dict.
    """
    saved = checkpoint.get("state_dict", checkpoint) if prefix else checkpoint
    if saved is not None:
        for name in names:
            saved.setdefault(f"{prefix}{name}", getattr(model, name))
