"""Data helpers for the ADTR plugin: a small built-in texture anomaly dataset in MVTec-AD layout."""

from adtr_anomalib.data.textures import DEFECT_TYPES, TEXTURE_CATEGORIES, default_dataset_root, make_texture_dataset

__all__ = ["DEFECT_TYPES", "TEXTURE_CATEGORIES", "default_dataset_root", "make_texture_dataset"]
