"""Deterministic built-in texture anomaly dataset in the MVTec-AD folder layout.

The images are crops of real texture photographs that ship inside scikit-image (``brick``, ``grass``, ``gravel``),
so the dataset can be generated offline, in seconds, with no download. Test images carry painted defects
(scratch, hole, stain, foreign material) with exact binary ground-truth masks. This gives the plugin a real,
reproducible dataset for smoke tests, examples and CI without shipping or fetching MVTec-AD.

Layout written by :func:`make_texture_dataset` (readable by anomalib's ``MVTecAD`` and ``Folder`` datamodules)::

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect>/000.png ...
    root/<category>/ground_truth/<defect>/000_mask.png ...
    root/<category>/manifest.json

The package is split by role: ``dataset`` (folders, manifest, idempotent and atomic generation), ``sampling``
(normal crops of the source photos), ``defects`` (the defect painters) and ``png_writer`` (threaded PNG encoding).
"""

from .dataset import default_dataset_root, make_texture_dataset
from .defects import DEFECT_TYPES
from .sampling import TEXTURE_CATEGORIES

__all__ = ["DEFECT_TYPES", "TEXTURE_CATEGORIES", "default_dataset_root", "make_texture_dataset"]
