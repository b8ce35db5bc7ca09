"""Frozen-backbone features computed once per training image and reused in later epochs.

The backbone is frozen, so while the inputs stay the same its features do too; on a CPU the backbone costs as much
as the transformer's training step. Lightning and anomalib have no such cache, hence this small one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def cache_blockers(datamodule: Any, dataset: Any) -> list[str]:
    """Reasons why the same image path can give different inputs in different epochs.

    The cache is keyed by image path, so it is only correct when none apply: training augmentations, or a training
    dataset that changes images on the fly (it says so with ``varies_between_epochs = True``, e.g. the synthetic
    anomalies of :class:`adtr_anomalib.data.AnomalyInjectionDataset`).

    Args:
        datamodule: The trainer's datamodule, or ``None``.
        dataset: The training dataset, or ``None``.

    Returns:
        Human-readable reasons; empty when the cache is safe.
    """
    blockers = []
    if getattr(datamodule, "train_augmentations", None) is not None:
        blockers.append("the datamodule has training augmentations")
    if getattr(dataset, "varies_between_epochs", False):
        blockers.append("the training images change every epoch (on-the-fly synthetic anomalies)")
    return blockers


class FeatureCache:
    """Backbone features by image path; off until :meth:`enable` is called with ``True``."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.enabled = False

    def enable(self, enabled: bool) -> None:
        """Switch the cache on or off for the coming training, empty either way."""
        self.enabled = enabled
        self.features.clear()

    def clear(self) -> None:
        """Free the stored features (end of training)."""
        self.features.clear()

    def transform(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every stored feature map by ``function`` of it (raw features standardised once fitted).

        One entry at a time, so memory grows by about one batch, not by a second copy of the cache.
        """
        for path, features in self.features.items():
            self.features[path] = function(features)

    def get(
        self, images: torch.Tensor, paths: Sequence[str] | None, extract: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Features of a batch: from the cache when every image of it is there, else from ``extract`` (and stored).

        Args:
            images: The pre-processed batch.
            paths: The batch's image paths (``None``: no caching possible).
            extract: The backbone feature function.

        Returns:
            ``(B, C, h, w)`` features.
        """
        if not self.enabled or paths is None:
            return extract(images)
        if all(path in self.features for path in paths):
            return torch.stack([self.features[path] for path in paths])
        features = extract(images)
        self.features.update(zip(paths, features, strict=True))
        return features
