"""adtr-anomalib: the ADTR anomaly-detection transformer as an anomalib model.

Importing this package registers ``ADTR`` and ``ADTRPlus`` with anomalib. An installed wheel also does that by
itself as soon as ``anomalib.models`` is imported (see ``adtr_anomalib_hook``), so ``anomalib train --model ADTR``
works without user code.
"""

# `data` is imported so the CLI also finds our datamodules by bare name (`--data WithAnomalies`); ~30 ms.
from adtr_anomalib import data  # noqa: F401
from adtr_anomalib._registration import register_models
from adtr_anomalib.models import ADTR, ADTRModel, ADTRPlus, ADTRSettings

__version__ = "0.2.0"
__all__ = ["ADTR", "ADTRModel", "ADTRPlus", "ADTRSettings", "__version__"]

register_models(ADTR, ADTRPlus)
