"""Checkpoint compatibility of ADTR and ADTR+, in one place.

- a file that is no checkpoint is refused with its name before torch reads it;
- the random number generators are saved and restored, so a resumed run continues exactly;
- a checkpoint of the other model (ADTR's given to ADTR+ or back) is refused with how to use it;
- a checkpoint defines the network it was trained with, and loads whatever evaluator it was saved with;
- checkpoints from before the feature and map statistics load with identity statistics;
- a trained network's weights are read from a file (ADTR+'s start, a continued ADTR) with its mismatches named.
"""

from __future__ import annotations

import logging
import random
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.utils.serialization import anomalib_safe_globals
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from .statistics import FEATURE_STATISTICS, MAP_STATISTICS

logger = logging.getLogger(__name__)

# Checkpoint entry holding the random number generators' state, so a resumed run continues exactly.
RNG_STATE_KEY = "adtr_rng_state"

# Constructor arguments that shape the network's tensors: a checkpoint that a model starts from must match them.
ARCHITECTURE_ARGUMENTS = (
    "backbone",
    "layers",
    "feature_stride",
    "patch_size",
    "reconstructor",
    "hidden_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "num_heads",
    "ffn_dim",
    "normalize_features",
)


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
        self, path: Any, map_location: Callable | None = lambda storage, _loc: storage, weights_only: bool | None = None
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


def check_saved_by(checkpoint: dict[str, Any], owner: str, owner_is_plus: bool, path: Any) -> None:
    """Refuse a checkpoint of the other model class, with the way to use it.

    ADTR and ADTR+ share the network, so without this Lightning would report only a missing or unexpected
    ``adtr_checkpoint_loaded`` entry. An ADTR+ checkpoint is recognised by its ``adtr_checkpoint`` argument.

    Args:
        checkpoint: The loaded Lightning checkpoint.
        owner: The loading model's class name, for the message.
        owner_is_plus: Whether the loading model is ADTR+ (takes ``adtr_checkpoint``).
        path: The checkpoint's path for the message (``None`` when unknown, e.g. ``load_from_checkpoint``).

    Raises:
        ValueError: If the checkpoint was saved by the other model.
    """
    saved_by_plus = "adtr_checkpoint" in (checkpoint.get("hyper_parameters") or {})
    if saved_by_plus == owner_is_plus:
        return
    name, arg = (str(path), repr(str(path))) if path else ("The checkpoint", "path")
    if owner_is_plus:
        msg = (
            f"{name} was saved by ADTR, not {owner}. To train ADTR+ starting from it, pass it as adtr_checkpoint: "
            f"ADTRPlus(adtr_checkpoint={arg}) or --model.adtr_checkpoint {arg} (ckpt_path takes ADTRPlus "
            "checkpoints only); to test or export it, use --model ADTR."
        )
    else:
        msg = (
            f"{name} was saved by ADTRPlus, not {owner}. To test, predict or export it, load it as ADTR+: "
            f"ADTRPlus.load_from_checkpoint({arg}) or --model ADTRPlus (the same network and scores). To train "
            f"ADTR further from its weights, start a new model with the same arguments from them: "
            f"{owner}(...).load_network_weights({arg})."
        )
    raise ValueError(msg)


def saved_arguments(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """ADTR's hyper-parameters as one flat mapping, its settings beside its arguments.

    Checkpoints keep the settings under ``settings``; those of earlier versions kept them flat beside the arguments.
    """
    flat = {key: value for key, value in hparams.items() if key != "settings"}
    return {**flat, **(hparams.get("settings") or {})}


def network_arguments_to_adopt(
    checkpoint: dict[str, Any], hparams: Mapping[str, Any], names: Iterable[str], owner: str
) -> dict[str, Any]:
    """The network's arguments ``names`` that the checkpoint has with other values than ``hparams``.

    ``anomalib predict/test --model ADTR --ckpt_path ...`` builds ADTR from its defaults (EfficientNet-B4),
    then Lightning loads the checkpoint into it; a model trained with another backbone or size would fail
    the state-dict load. The checkpoint defines the network, so its arguments win.

    Args:
        checkpoint: The Lightning checkpoint being loaded.
        hparams: The module's hyper-parameters.
        names: Arguments and settings that define the network.
        owner: Name of the model, for the log message.

    Returns:
        The arguments to take from the checkpoint (empty: the network stays as it is).
    """
    saved = saved_arguments(checkpoint.get("hyper_parameters") or {})
    current = saved_arguments(hparams)
    changed = {k: saved[k] for k in names if k in saved and plain(saved[k]) != plain(current[k])}
    if changed:
        logger.info("%s: network arguments taken from the checkpoint: %s", owner, changed)
    return changed


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


def read_network_state(
    path: str | Path, network: nn.Module, hparams: Any, argument: str, owner: str, safe_globals: list
) -> dict[str, torch.Tensor]:
    """The ``ADTRModel`` state dict of a trained ADTR or ADTR+ file, checked against ``network`` before loading.

    Args:
        path: A Lightning ``.ckpt`` of ADTR or ADTR+, or a saved ``ADTRModel`` state dict.
        network: The ``ADTRModel`` that will load it (missing statistics are taken from it: identity).
        hparams: The loading model's arguments and settings (:func:`saved_arguments`), compared with those the file
            was trained with.
        argument: The argument that named the file, for the messages.
        owner: The loading model's class name, for the messages.
        safe_globals: Classes ``torch.load(weights_only=True)`` may rebuild (the model's checkpoint globals).

    Returns:
        The state dict, ready for ``network.load_state_dict(state, strict=True)``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a checkpoint of this network (names the differences).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"{argument} '{path}' does not exist."
        raise FileNotFoundError(msg)
    try:
        with anomalib_safe_globals(extra=safe_globals):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"{argument} '{path}' could not be read as a torch checkpoint: {error}"
        raise ValueError(msg) from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        msg = f"{argument} '{path}' holds no state dict."
        raise ValueError(msg)
    if any(key.startswith("model.") for key in state):  # a Lightning checkpoint of ADTR or ADTR+
        state = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    if any(key.startswith("reconstructor.") for key in state):  # saved before the statistics: identity
        fill_statistics(state, network, (*FEATURE_STATISTICS, *MAP_STATISTICS), prefix="")
    trained_with = saved_arguments(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    architecture = {key: trained_with[key] for key in ARCHITECTURE_ARGUMENTS if key in trained_with}
    # Shapes alone miss a different head count or backbone of the same width: compare the saved arguments.
    differs = [key for key, value in architecture.items() if plain(value) != plain(hparams[key])]
    # The map statistics' shape follows the image size too, but says less than the learned tensors.
    problem = state_dict_mismatch(network.state_dict(), state, last=MAP_STATISTICS)
    if differs:
        problem = "; ".join(f"{key}={architecture[key]!r} there, {hparams[key]!r} here" for key in differs)
    if problem:
        msg = (
            f"{argument} '{path}' does not fit this {owner} model ({problem}). Build {owner} with the same "
            "backbone, layers, transformer sizes and image size as the trained model"
            + (f"; the checkpoint's: {architecture}." if architecture else ".")
        )
        raise ValueError(msg)
    return state


def state_dict_mismatch(expected: dict[str, torch.Tensor], given: dict[str, Any], last: Iterable[str] = ()) -> str:
    """One line on how ``given`` differs from ``expected`` (empty when it loads), instead of torch's long list.

    Args:
        expected: The state dict of the network to load into.
        given: The state dict read from the file.
        last: Keys to report after the others (they say less about what went wrong).

    Returns:
        The differences, or an empty string.
    """
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    ordered = sorted(expected.items(), key=lambda item: item[0] in set(last))
    wrong_shape = [
        f"{key}: {tuple(getattr(given[key], 'shape', ()))} in the file, {tuple(value.shape)} here"
        for key, value in ordered
        if key in given and getattr(given[key], "shape", None) != value.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if wrong_shape:
        parts.append(f"{len(wrong_shape)} with other shapes, e.g. {wrong_shape[0]}")
    return "; ".join(parts)
