"""The models a benchmark compares, each built with the shared backbone weights, pre-processing and metrics."""

from __future__ import annotations

from typing import Any

from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule

from adtr_anomalib.metrics import inspection_evaluator
from adtr_anomalib.models import ADTR, ADTRPlus
from adtr_anomalib.models.adtr.components.backbone import load_backbone_weights
from adtr_anomalib.models.adtr.components.settings import SETTING_NAMES
from adtr_anomalib.models.adtr.lightning_base import constructor_parameters
from adtr_anomalib.post_processing import RankPreservingPostProcessor

METRICS = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO")
# Stages of EfficientNet-family backbones that mirror the ResNet stages anomalib uses by default:
# PaDiM layer1-3 (strides 4/8/16), PatchCore layer2-3 (strides 8/16).
PADIM_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")

MODEL_CLASSES: dict[str, type[AnomalibModule]] = {
    "adtr": ADTR,
    "adtr_plus": ADTRPlus,
    "padim": Padim,
    "patchcore": Patchcore,
}
DISPLAY_NAMES = {"adtr": "ADTR", "adtr_plus": "ADTR+", "padim": "PaDiM", "patchcore": "PatchCore"}
# Our defaults where anomalib's do not fit the EfficientNet backbones (PaDiM has no n_features default for them).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "padim": {"layers": list(PADIM_LAYERS), "n_features": 100},
    "patchcore": {"layers": list(PATCHCORE_LAYERS), "coreset_sampling_ratio": 0.01},
}
# Set by the benchmark for every model alike (fairness), never per model.
SHARED_ARGUMENTS = (
    "backbone",
    "weights",
    "pre_trained",
    "pre_processor",
    "post_processor",
    "evaluator",
    "visualizer",
)


def model_key(name: str) -> str:
    """``"ADTRPlus"``, ``"adtr_plus"`` or ``"ADTR+"`` -> ``"adtr_plus"``; unknown names are refused.

    Args:
        name: Model name in any of these spellings, any case.

    Returns:
        The model's key in :data:`MODEL_CLASSES`.

    Raises:
        ValueError: If the name matches no model.
    """
    wanted = name.lower().replace("+", "plus").replace("_", "")
    for key in MODEL_CLASSES:
        if key.replace("_", "") == wanted:
            return key
    msg = f"Unknown model {name!r}; choose from {sorted(MODEL_CLASSES)}."
    raise ValueError(msg)


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options the model does not take, or that every model must share, before anything runs.

    Args:
        name: Model name, as :func:`model_key` accepts it.
        options: The model's ``init_args``.

    Raises:
        ValueError: If an option is set by the benchmark for every model or is not the model's argument.
    """
    key = model_key(name)
    shared = sorted(set(options) & set(SHARED_ARGUMENTS))
    if shared:
        msg = (
            f"{name}: init_args {shared} are set by the benchmark for every model alike; backbone, weights and "
            "image_size are top-level settings."
        )
        raise ValueError(msg)
    accepted = set(constructor_parameters(MODEL_CLASSES[key]))
    if issubclass(MODEL_CLASSES[key], ADTR):  # ADTR's settings may also be given by name
        accepted |= set(SETTING_NAMES)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        msg = f"{name}: unknown init_args {unknown}; {MODEL_CLASSES[key].__name__} takes {sorted(accepted)}."
        raise ValueError(msg)


def build_model(
    name: str,
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 256,
    weights: str | None = None,
    **options: Any,
) -> AnomalibModule:
    """Build ``adtr``, ``adtr_plus``, ``padim`` or ``patchcore`` with the shared backbone, weights and pre-processing.

    Every model gets the same resize and backbone normalisation, the same metrics (:func:`inspection_evaluator`)
    and no visualiser (writing heat maps would count as test time). PaDiM and PatchCore are built with
    ``pre_trained=False`` and then get the shared weights through :func:`load_backbone_weights`, so the offline
    Lite0 weights work for them too.

    Args:
        name: Model name, as :func:`model_key` accepts it.
        backbone: timm backbone of every model.
        image_size: Side of the square model input.
        weights: Backbone weights file; ``None`` uses packaged offline weights or timm's hub.
        **options: The model's own arguments; they override :data:`DEFAULT_OPTIONS`.

    Returns:
        The model. ADTR and ADTR+ load their backbone weights when training starts, the others here.
    """
    key = model_key(name)
    check_model_options(name, options)
    shared = {
        "pre_processor": ADTR.configure_pre_processor((image_size, image_size), backbone=backbone),
        "evaluator": inspection_evaluator(),
        # Validation is held-back images: anomalib's clamp would tie test scores and lower every ranking metric.
        "post_processor": RankPreservingPostProcessor(),
        "visualizer": False,
    }
    kwargs = {**DEFAULT_OPTIONS.get(key, {}), **options, **shared}
    if key in {"adtr", "adtr_plus"}:
        return MODEL_CLASSES[key](backbone=backbone, weights=weights, **kwargs)
    model = MODEL_CLASSES[key](backbone=backbone, pre_trained=False, **kwargs)
    load_backbone_weights(model.model.feature_extractor.feature_extractor, backbone, weights)
    return model
