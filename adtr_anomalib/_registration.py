"""Make our models visible to anomalib's lookups (``get_model``, ``list_models``, the CLI, benchmarks).

anomalib has no plugin entry points: ``get_model``/``list_models`` scan ``AnomalibModule.__subclasses__()``
and the benchmark pipeline does ``getattr(anomalib.models, name)``. Importing our classes covers the first;
this module covers the second.
"""

from __future__ import annotations

import anomalib.models


def register_models(*classes: type) -> None:
    """Expose ``classes`` as attributes of ``anomalib.models`` (idempotent)."""
    for cls in classes:
        setattr(anomalib.models, cls.__name__, cls)
        if cls.__name__ not in anomalib.models.__all__:
            anomalib.models.__all__.append(cls.__name__)
