"""anomalib models added by this plugin."""

from .adtr import ADTR, ADTRModel

__all__ = ["ADTR", "ADTRModel"]
