"""A post-processor whose normalised scores keep the raw scores' order, whatever the validation images were.

anomalib's :class:`~anomalib.post_processing.PostProcessor` maps scores linearly around the validation threshold
and clamps them to [0, 1]. Test metrics are computed on those clamped values, so every test score beyond the
clamp ties with its neighbours: with held-back validation images (not the test images), real defects weaker than
the validation anomalies tie with normal images at 0, and AUROC, AUPRO and F1Max fall although the raw scores
rank them correctly (docs/thresholds.md).
"""

from __future__ import annotations

import torch
from anomalib.post_processing import PostProcessor

__all__ = ["RankPreservingPostProcessor"]


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's post-processor with a sigmoid instead of the clamp: same thresholds, labels and masks.

    The normalised value is ``sigmoid(4 (x - threshold) / (max - min))``: in (0, 1), 0.5 exactly at the
    threshold (so ``pred_label`` and ``pred_mask`` are anomalib's), the same slope there as anomalib's linear
    map, and strictly increasing everywhere, so ranking metrics equal those of the raw scores. Only
    ``_normalize`` is replaced; statistics, thresholds, checkpointing and export are anomalib's.
    """

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Squash ``preds`` around ``threshold``; unchanged while no statistics were computed (NaN min/max)."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        normalized = torch.sigmoid(4 * (preds - threshold) / safe_range)
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)
