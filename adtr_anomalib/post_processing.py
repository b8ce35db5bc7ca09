"""A post-processor whose normalised scores keep the raw scores' order, whatever the validation images were.

anomalib's :class:`~anomalib.post_processing.PostProcessor` maps scores linearly around the validation threshold
and clamps them to [0, 1]. Test metrics are computed on those clamped values, so every test score beyond the
clamp ties with its neighbours: with held-back validation images (not the test images), real defects weaker than
the validation anomalies tie with normal images at 0, and AUROC, AUPRO and F1Max fall although the raw scores
rank them correctly (docs/thresholds.md).

Its pixel threshold can also come from the normal validation images alone (``pixel_normal_quantile``): anomalib's F1
threshold is fitted to the validation anomalies, and where those are synthetic it sits low enough to outline the
normal texture of good images; a high quantile of normal maps bounds the area outlined on good images instead.
"""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric, F1AdaptiveThreshold
from anomalib.post_processing import PostProcessor
from torchmetrics import Metric

__all__ = ["PIXEL_NORMAL_QUANTILE", "NormalQuantileThreshold", "RankPreservingPostProcessor"]

# The pixel threshold the demo and the ADTR configs draw outlines with: on the built-in textures it outlined the least
# of the good test images among the rules tried while still finding 97-98% of the defect regions, for ADTR and PaDiM
# (benchmarks/README.md, "Pictures a user can trust").
PIXEL_NORMAL_QUANTILE = 0.9999


class _NormalQuantile(Metric):
    """The ``quantile`` of anomaly-map values on normal images (label 0); anomalib's thresholds are F1-based or
    manual, none bounds the false-alarm area, hence this one."""

    full_state_update = False

    def __init__(self, quantile: float, values_per_image: int = 16384, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < quantile < 1.0:
            msg = f"pixel_normal_quantile must lie strictly between 0 and 1 (e.g. 0.999), got {quantile!r}."
            raise ValueError(msg)
        self.quantile = quantile
        self.values_per_image = values_per_image
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: torch.Tensor, gt_label: torch.Tensor) -> None:
        """Keep an evenly spaced sample of each normal image's map values (memory stays small on large images)."""
        normal = anomaly_map[gt_label.reshape(-1) == 0].flatten(1).float()
        if normal.numel():
            step = max(1, normal.shape[1] // self.values_per_image)
            self.values.append(normal[:, ::step].flatten())

    def compute(self) -> torch.Tensor:
        """NaN where no normal image was seen: the post-processor then keeps no pixel threshold."""
        values = torch.cat(self.values) if isinstance(self.values, list) else self.values
        if not values.numel():
            return torch.tensor(float("nan"))
        return torch.quantile(values, self.quantile)


class NormalQuantileThreshold(AnomalibMetric, _NormalQuantile):
    """:class:`_NormalQuantile` fed from anomalib batches (``anomaly_map``, ``gt_label``)."""


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's post-processor with a sigmoid instead of the clamp: same thresholds, labels and masks.

    The normalised value is ``sigmoid(4 (x - threshold) / (max - min))``: in (0, 1), 0.5 exactly at the
    threshold (so ``pred_label`` and ``pred_mask`` are anomalib's), the same slope there as anomalib's linear
    map, and strictly increasing everywhere, so ranking metrics equal those of the raw scores. Only
    ``_normalize`` is replaced; statistics, thresholds, checkpointing and export are anomalib's.

    Args:
        pixel_normal_quantile: Pixel threshold at this quantile of the anomaly maps of the normal validation images
            (0.999: about 0.1% of a good image's pixels outlined), instead of anomalib's F1 threshold on the
            validation anomalies. ``None`` keeps anomalib's. Ranking metrics do not depend on it.
        **kwargs: anomalib ``PostProcessor`` arguments.
    """

    def __init__(self, pixel_normal_quantile: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pixel_normal_quantile = pixel_normal_quantile

    @property
    def pixel_normal_quantile(self) -> float | None:
        """The quantile of normal maps the pixel threshold is set at; ``None``: anomalib's F1 threshold."""
        return self._pixel_normal_quantile

    @pixel_normal_quantile.setter
    def pixel_normal_quantile(self, quantile: float | None) -> None:
        # A setter, so that a checkpoint's configuration (load_checkpoint_config) also swaps the threshold metric.
        self._pixel_normal_quantile = quantile
        self._pixel_threshold_metric = (
            F1AdaptiveThreshold(fields=["anomaly_map", "gt_mask"], strict=False)
            if quantile is None
            else NormalQuantileThreshold(quantile=quantile, fields=["anomaly_map", "gt_label"], strict=False)
        )

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "pixel_normal_quantile")

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
