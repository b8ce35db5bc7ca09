"""Fewer images for quick runs: a seeded subset of the training split and of each label of the test split.

anomalib's ``random_split`` draws fractions; a time budget is easier to meet with counts, so this draws counts
with the same ingredients (``AnomalibDataset.subsample``, a seeded generator).
"""

from __future__ import annotations

import copy

import numpy as np
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset

__all__ = ["subsample_splits"]


def subsample_splits(
    datamodule: AnomalibDataModule,
    max_train_images: int | None = None,
    max_test_images_per_label: int | None = None,
    seed: int = 0,
) -> None:
    """Keep at most ``max_train_images`` training images and ``max_test_images_per_label`` normal and anomalous
    test images, drawn with ``seed`` from the path-sorted lists; in place, on a set-up datamodule.

    The same data and seed give the same images, so models compared on a subset see the same images. When the
    validation split is the test split (``val_split_mode="same_as_test"``) it follows the test subset, so the
    post-processor's normalisation still spans every test score.

    Args:
        datamodule: A datamodule after ``setup()``; changed in place.
        max_train_images: Most training images to keep; ``None`` keeps them all.
        max_test_images_per_label: Most normal and most anomalous test images to keep; ``None`` keeps them all.
        seed: Seed of the draw.

    Raises:
        RuntimeError: ``datamodule.setup()`` was not called.
        ValueError: A limit is not a positive integer (the message names it).
    """
    limits = {"max_train_images": max_train_images, "max_test_images_per_label": max_test_images_per_label}
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            msg = f"{name} must be a positive integer or None, got {value!r}."
            raise ValueError(msg)
    if getattr(datamodule, "test_data", None) is None or not hasattr(datamodule, "train_data"):
        msg = f"{type(datamodule).__name__} has no train/test data yet: call datamodule.setup() first."
        raise RuntimeError(msg)
    rng = np.random.default_rng(seed)
    if max_train_images is not None:
        datamodule.train_data = _draw(datamodule.train_data, [range(len(datamodule.train_data))], max_train_images, rng)
    if max_test_images_per_label is not None:
        test = datamodule.test_data
        val = getattr(datamodule, "val_data", None)
        val_is_test = val is not None and sorted(val.samples["image_path"]) == sorted(test.samples["image_path"])
        labels = test.samples["label_index"].to_numpy()
        groups = [np.flatnonzero(labels == label) for label in sorted(set(labels.tolist()))]
        datamodule.test_data = _draw(test, groups, max_test_images_per_label, rng)
        if val_is_test:
            datamodule.val_data = copy.deepcopy(datamodule.test_data)


def _draw(dataset: AnomalibDataset, groups: list, limit: int, rng: np.random.Generator) -> AnomalibDataset:
    """``limit`` samples of each group of indices (all of a smaller group), drawn from the path-sorted group."""
    paths = dataset.samples["image_path"].to_numpy()
    keep: list[int] = []
    for group in groups:
        ordered = sorted(group, key=lambda i: paths[i])
        picks = rng.choice(len(ordered), size=min(limit, len(ordered)), replace=False)
        keep += [int(ordered[i]) for i in picks]
    return dataset.subsample(sorted(keep))
