"""Deployment settings shared by the export tests, the speed benchmark and users' inference code.

Exported ADTR models are anomalib's own (``anomalib export``); nothing here replaces its exporters or
inferencers. What anomalib leaves to the user is the OpenVINO runtime configuration, and OpenVINO's CPU
plugin silently computes in bf16 on CPUs with AVX-512 BF16 or AMX unless told otherwise, so "FP32" needs an
explicit precision hint.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["PARITY_TOLERANCES", "openvino_config"]

# Max |difference| from the torch model of the post-processed outputs (normalised scores and anomaly maps,
# both in [0, 1]; threshold 0.5), by precision class. tests/test_export.py holds every runtime to these.
PARITY_TOLERANCES = {
    "fp32": 1e-4,  # ONNX Runtime; OpenVINO at f32 inference precision
    "reduced": 0.05,  # OpenVINO FP16 IR, bf16 execution, INT8 weight compression
    "int8_ptq": 0.15,  # OpenVINO INT8 post-training quantisation of weights and activations
}


def openvino_config(precision: Literal["f32", "bf16", "f16"] = "f32", threads: int | None = None) -> dict[str, str]:
    """OpenVINO CPU compile options: inference precision, and optionally the thread count.

    Pass as ``OpenVINOInferencer(path, device="CPU", config=openvino_config("f32"))`` for results that match
    the torch model to ``PARITY_TOLERANCES["fp32"]``; ``"bf16"`` is OpenVINO's default on CPUs that support it.

    Args:
        precision: OpenVINO's inference precision hint.
        threads: CPU threads for inference; ``None`` leaves OpenVINO's default.

    Returns:
        The ``config`` dictionary, values as strings.

    Raises:
        ValueError: If ``precision`` is not ``"f32"``, ``"bf16"`` or ``"f16"``.
    """
    if precision not in {"f32", "bf16", "f16"}:
        msg = f"precision must be 'f32', 'bf16' or 'f16', got {precision!r}."
        raise ValueError(msg)
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config
