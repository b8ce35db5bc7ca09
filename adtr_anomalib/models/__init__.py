"""anomalib models added by this plugin."""

from .adtr import ADTR, ADTRModel
from .adtr_plus import ADTRPlus

__all__ = ["ADTR", "ADTRModel", "ADTRPlus"]
