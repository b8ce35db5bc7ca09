"""The parts of ADTR: the backbone and its weights, the reconstructor and its transformer layers, the training
statistics, the settings and their recipes, step budgets, the feature cache, checkpoint checks and export settings."""

from .backbone import DEFAULT_LAYERS
from .reconstructor import RECONSTRUCTORS, ADTRReconstructor, ReconstructorKind
from .statistics import FEATURE_STATISTICS, MAP_STATISTICS, SumReduce, moments, per_pixel_statistics
from .transformer import ATTENTION_DROPOUTS, LOCALITY_BIAS_FLOOR, AttentionDropout, attention_bias

__all__ = [
    "ATTENTION_DROPOUTS",
    "DEFAULT_LAYERS",
    "FEATURE_STATISTICS",
    "LOCALITY_BIAS_FLOOR",
    "MAP_STATISTICS",
    "RECONSTRUCTORS",
    "ADTRReconstructor",
    "AttentionDropout",
    "ReconstructorKind",
    "SumReduce",
    "attention_bias",
    "moments",
    "per_pixel_statistics",
]
