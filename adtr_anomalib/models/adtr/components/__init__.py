"""The parts of ADTR's torch model: the reconstructor and its transformer layers, and the training statistics."""

from .reconstructor import RECONSTRUCTORS, ADTRReconstructor, ReconstructorKind
from .statistics import SumReduce, moments, per_pixel_statistics
from .transformer import ATTENTION_DROPOUTS, LOCALITY_BIAS_FLOOR, AttentionDropout, attention_bias

__all__ = [
    "ATTENTION_DROPOUTS",
    "LOCALITY_BIAS_FLOOR",
    "RECONSTRUCTORS",
    "ADTRReconstructor",
    "AttentionDropout",
    "ReconstructorKind",
    "SumReduce",
    "attention_bias",
    "moments",
    "per_pixel_statistics",
]
