"""anomalib models added by this plugin."""

from .adtr import ADTR, ADTRModel, ADTRSettings
from .adtr_plus import ADTRPlus

__all__ = ["ADTR", "ADTRModel", "ADTRPlus", "ADTRSettings"]
