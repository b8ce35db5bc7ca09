"""Export settings of ADTR and ADTR+ on top of anomalib's exporters: INT8 that keeps the scores, frozen torch files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from anomalib.models.components import AnomalibModule
from torch import nn


def quantize_ov(model: Any, datamodule: Any = None) -> Any:
    """anomalib's INT8 post-training quantisation, with NNCF settings that keep ADTR's scores close.

    CPUs without AVX-512 VNNI (e.g. AVX2-only ones) sum pairs of u8 x s8 products in int16, which saturates
    with 8-bit weights: on such a CPU the default quantisation moved the normalised scores by 0.3 (tolerance
    0.15). The overflow fix on every layer (7-bit weights) alone left 0.17, with NNCF's transformer preset 0.16;
    with the scoring tail in float as well, ``tests/test_export.py`` passes. anomalib's implementation takes no NNCF
    arguments, so it runs with ``nncf.quantize`` given them.

    Args:
        model: The OpenVINO model to quantise.
        datamodule: The calibration data (anomalib's argument).

    Returns:
        The quantised OpenVINO model.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    quantize = nncf.quantize
    options = {
        "advanced_parameters": AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        "model_type": nncf.ModelType.TRANSFORMER,  # NNCF's preset for attention: keeps softmax/norms precise
        # The scoring tail (distance, up-sampling, pooling, maximum) stays in float: it is cheap, and an 8-bit
        # anomaly map moves the image score more than the quantised network does.
        "ignored_scope": nncf.IgnoredScope(
            types=["Interpolate", "AvgPool", "ReduceMax", "ReduceL2", "Sqrt"], validate=False
        ),
    }
    nncf.quantize = lambda *args, **kwargs: quantize(*args, **options, **kwargs)
    try:
        return AnomalibModule._post_training_quantization_ov(model, datamodule)
    finally:
        nncf.quantize = quantize


@contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Every parameter frozen inside, the module's own flags restored after (export can happen mid-training).

    ``TorchInferencer`` calls the exported model without ``torch.no_grad``; with frozen parameters no autograd graph
    is built for each image.
    """
    flags = {name: parameter.requires_grad for name, parameter in module.named_parameters()}
    module.requires_grad_(False)
    try:
        yield
    finally:
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(flags[name])
