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
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import AnomalibMetric, F1AdaptiveThreshold
from anomalib.post_processing import PostProcessor
from torchmetrics import Metric

__all__ = [
    "IMAGE_NORMAL_QUANTILE",
    "PIXEL_NORMAL_QUANTILE",
    "NormalQuantileThreshold",
    "RankPreservingPostProcessor",
    "inspection_post_processor",
]

# The thresholds the demo and the ADTR configs judge and outline with, outlines following the image decision. On the
# built-in textures, with thresholds from held-back training images and from half of the test folder, for ADTR and
# PaDiM, this pair flagged and outlined little of the good test images while still finding most defect regions
# (benchmarks/README.md, "Pictures a user can trust"). The image threshold is the highest normal validation score, so
# none of those images is flagged; outlines only on flagged images let the pixel quantile stay low enough to outline
# most of each defect.
IMAGE_NORMAL_QUANTILE = 1.0
PIXEL_NORMAL_QUANTILE = 0.99


class _NormalQuantile(Metric):
    """The ``quantile`` of anomaly-map values on normal images (label 0); anomalib's thresholds are F1-based or
    manual, none bounds the false-alarm area, hence this one."""

    full_state_update = False

    def __init__(self, quantile: float, values_per_image: int = 16384, name: str = "quantile", **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < quantile <= 1.0:
            msg = f"{name} must lie in (0, 1] (e.g. 0.999; 1 is the maximum), got {quantile!r}."
            raise ValueError(msg)
        self.quantile = quantile
        self.values_per_image = values_per_image
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor, gt_label: torch.Tensor) -> None:
        """Keep an evenly spaced sample of each normal image's values (a score, or a map: memory stays small on large
        images)."""
        normal = values.reshape(len(gt_label.reshape(-1)), -1)[gt_label.reshape(-1) == 0].float()
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
    """:class:`_NormalQuantile` fed from anomalib batches (``pred_score`` or ``anomaly_map``, and ``gt_label``)."""


def _normal_quantile_setting(level: str, values: str, anomalies: str) -> property:
    """The ``{level}_normal_quantile`` property: setting it picks the ``{level}`` threshold metric, anomalib's F1
    threshold on ``values`` against ``anomalies`` (``None``) or the quantile of the normal images' ``values``."""
    name = f"{level}_normal_quantile"

    def get(self: PostProcessor) -> float | None:
        return getattr(self, f"_{name}")

    def set_(self: PostProcessor, quantile: float | None) -> None:
        metric = (
            F1AdaptiveThreshold(fields=[values, anomalies], strict=False)
            if quantile is None
            else NormalQuantileThreshold(quantile=quantile, name=name, fields=[values, "gt_label"], strict=False)
        )
        setattr(self, f"_{level}_threshold_metric", metric)
        setattr(self, f"_{name}", quantile)

    return property(get, set_, doc=f"The quantile of normal {level} values the threshold is set at; None: F1.")


class RankPreservingPostProcessor(PostProcessor):
    """anomalib's post-processor with a sigmoid instead of the clamp: same thresholds, labels and masks.

    The normalised value is ``sigmoid(4 (x - threshold) / (max - min))``: in (0, 1), 0.5 exactly at the
    threshold (so ``pred_label`` and ``pred_mask`` are anomalib's), the same slope there as anomalib's linear
    map, and strictly increasing everywhere, so ranking metrics equal those of the raw scores. Only
    ``_normalize`` is replaced; statistics, thresholds, checkpointing and export are anomalib's.

    Args:
        image_normal_quantile: Image threshold at this quantile of the normal validation images' scores (1: their
            maximum, so none of them is flagged), instead of anomalib's F1 threshold on the validation anomalies.
            ``None`` keeps anomalib's. Ranking metrics do not depend on it.
        pixel_normal_quantile: Pixel threshold at this quantile of the anomaly maps of the normal validation images
            (0.999: about 0.1% of a good image's pixels outlined), instead of anomalib's F1 threshold on the
            validation anomalies. ``None`` keeps anomalib's.
        masks_follow_labels: Empty ``pred_mask`` wherever ``pred_label`` is normal, so a part the image threshold
            passes shows no outline. ``False`` keeps anomalib's masks, thresholded pixel by pixel.
        **kwargs: anomalib ``PostProcessor`` arguments.
    """

    def __init__(
        self,
        image_normal_quantile: float | None = None,
        pixel_normal_quantile: float | None = None,
        masks_follow_labels: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_normal_quantile = image_normal_quantile
        self.pixel_normal_quantile = pixel_normal_quantile
        self.masks_follow_labels = masks_follow_labels

    # Properties with setters, so that a checkpoint's configuration (load_checkpoint_config) also swaps the metrics.
    image_normal_quantile = _normal_quantile_setting("image", "pred_score", "gt_label")
    pixel_normal_quantile = _normal_quantile_setting("pixel", "anomaly_map", "gt_mask")

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        keys = ("image_normal_quantile", "pixel_normal_quantile", "masks_follow_labels")
        return (*super()._checkpoint_config_keys, *keys)

    def _gate(self, pred_mask: torch.Tensor | None, pred_label: torch.Tensor | None) -> torch.Tensor | None:
        """``pred_mask`` emptied on the images whose ``pred_label`` is normal (with ``masks_follow_labels``)."""
        if not self.masks_follow_labels or pred_mask is None or pred_label is None or pred_mask.dtype != torch.bool:
            return pred_mask
        return pred_mask & pred_label.reshape(-1, *[1] * (pred_mask.dim() - 1)).bool()

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """anomalib's post-processing (also what an exported model runs), with masks that follow the labels."""
        result = super().forward(predictions)
        return result._replace(pred_mask=self._gate(result.pred_mask, result.pred_label))

    def threshold_batch(self, batch: Batch) -> None:
        """anomalib's thresholds, with masks that follow the labels."""
        super().threshold_batch(batch)
        batch.pred_mask = self._gate(batch.pred_mask, batch.pred_label)

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


def inspection_post_processor() -> RankPreservingPostProcessor:
    """The demo's post-processor: thresholds from the held-back normal images, outlines only on flagged images."""
    return RankPreservingPostProcessor(
        image_normal_quantile=IMAGE_NORMAL_QUANTILE,
        pixel_normal_quantile=PIXEL_NORMAL_QUANTILE,
        masks_follow_labels=True,
    )
