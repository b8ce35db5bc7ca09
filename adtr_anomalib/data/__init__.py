"""Data helpers for the ADTR plugin.

* a small built-in texture anomaly dataset in MVTec-AD layout (:func:`make_texture_dataset`);
* a ``Folder`` datamodule for any MVTec-layout folder (:func:`mvtec_layout_folder`);
* BSData ball-screw pitting, downloaded and built like anomalib's own data sets (:class:`BSData`);
* anomalies in the training set for ADTR+: :class:`FolderWithAnomalies`, :class:`WithAnomalies`,
  :func:`move_test_anomalies_to_train`;
* on-the-fly synthetic anomalies: :class:`ConfettiNoise`, :class:`AnomalyInjectionDataset`;
* up-front checks of image and mask files that name the bad file (:mod:`adtr_anomalib.data.validation`).
* seeded subsets of the training and test images for quick runs: :func:`subsample_splits`.
"""

import logging

from adtr_anomalib.data.anomalies import (
    FolderWithAnomalies,
    WithAnomalies,
    add_training_anomalies,
    move_test_anomalies_to_train,
)
from adtr_anomalib.data.bsdata import BSData
from adtr_anomalib.data.folder import HELD_OUT_VALIDATION, TEST_FOLDER_VALIDATION, mvtec_layout_folder
from adtr_anomalib.data.subset import subsample_splits
from adtr_anomalib.data.synthetic import AnomalyInjectionDataset, ConfettiNoise
from adtr_anomalib.data.textures import DEFECT_TYPES, TEXTURE_CATEGORIES, default_dataset_root, make_texture_dataset
from adtr_anomalib.data.validation import DataError, HiddenFilesFilter, check_datamodule_files, check_folder_layout

__all__ = [
    "DEFECT_TYPES",
    "HELD_OUT_VALIDATION",
    "TEST_FOLDER_VALIDATION",
    "TEXTURE_CATEGORIES",
    "AnomalyInjectionDataset",
    "BSData",
    "ConfettiNoise",
    "DataError",
    "FolderWithAnomalies",
    "WithAnomalies",
    "add_training_anomalies",
    "check_datamodule_files",
    "check_folder_layout",
    "default_dataset_root",
    "make_texture_dataset",
    "move_test_anomalies_to_train",
    "mvtec_layout_folder",
    "subsample_splits",
]

# anomalib reports every image of a data set under a hidden folder (e.g. the built-in textures in ~/.cache) as hidden.
logging.getLogger("anomalib.data.utils.path").addFilter(HiddenFilesFilter())
