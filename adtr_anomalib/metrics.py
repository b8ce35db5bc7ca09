"""The metric set used by our demo and benchmarks: the ones that matter for inspection."""

from __future__ import annotations

from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max


def inspection_evaluator(pixel: bool = True) -> Evaluator:
    """Image AUROC and F1Max; with ``pixel``, also pixel AUROC and AUPRO up to 30% FPR (MVTec-AD convention).

    Scores reach these metrics after anomalib's post-processor has min-max normalised them; raw distances
    would be squashed by torchmetrics' sigmoid and give AUROC 0.5.

    Args:
        pixel: Add the pixel metrics; turn off for data without masks.

    Returns:
        An ``Evaluator`` with these as its test metrics.
    """
    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
    ]
    if pixel:
        metrics += [
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
        ]
    return Evaluator(test_metrics=metrics)
