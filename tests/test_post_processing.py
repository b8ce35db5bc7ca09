"""RankPreservingPostProcessor: anomalib's thresholds and labels, without the clamp that ties test scores."""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch
from anomalib.post_processing import PostProcessor
from torchmetrics.functional.classification import binary_auroc

from adtr_anomalib.post_processing import RankPreservingPostProcessor


def _fitted(post_processor: PostProcessor, low: float, high: float, threshold: float) -> PostProcessor:
    """Statistics as validation on held-back images would leave them (image and pixel alike)."""
    for name in ("image", "pixel"):
        getattr(post_processor, f"{name}_min").fill_(low)
        getattr(post_processor, f"{name}_max").fill_(high)
        getattr(post_processor, f"_{name}_threshold").fill_(threshold)
    return post_processor


def _test_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """Normal scores around 1, weak real defects around 1.8: far below the validation anomalies (up to 10)."""
    generator = torch.Generator().manual_seed(0)
    normal = 1.0 + 0.3 * torch.randn(200, generator=generator)
    defects = 1.8 + 0.3 * torch.randn(50, generator=generator)
    return torch.cat([normal, defects]), torch.cat([torch.zeros(200), torch.ones(50)]).int()


def test_ranking_metrics_equal_the_raw_scores_whatever_the_validation_range() -> None:
    scores, labels = _test_scores()
    raw_auroc = binary_auroc(scores, labels)
    ours = _fitted(RankPreservingPostProcessor(), low=0.5, high=10.0, threshold=9.0)
    anomalib = _fitted(PostProcessor(), low=0.5, high=10.0, threshold=9.0)
    ranked = ours(InferenceBatch(pred_score=scores, anomaly_map=scores[:, None, None])).pred_score
    clamped = anomalib(InferenceBatch(pred_score=scores, anomaly_map=scores[:, None, None])).pred_score
    assert torch.equal(torch.argsort(ranked), torch.argsort(scores))
    torch.testing.assert_close(binary_auroc(ranked, labels), raw_auroc)
    # The control: anomalib's clamp ties every one of these scores at 0, which the test would report.
    assert (clamped == 0).all()
    assert binary_auroc(clamped, labels) < raw_auroc - 0.3


def test_labels_masks_and_threshold_are_anomalib_s() -> None:
    scores = torch.linspace(-2.0, 12.0, 301)
    batch = InferenceBatch(pred_score=scores, anomaly_map=scores.reshape(1, 1, 301).expand(2, 1, 301))
    ours = _fitted(RankPreservingPostProcessor(), low=0.0, high=8.0, threshold=3.0)(batch)
    anomalib = _fitted(PostProcessor(), low=0.0, high=8.0, threshold=3.0)(batch)
    assert torch.equal(ours.pred_label, anomalib.pred_label)
    assert torch.equal(ours.pred_mask, anomalib.pred_mask)
    assert ((ours.pred_score > 0) & (ours.pred_score < 1)).all()
    at_threshold = RankPreservingPostProcessor._normalize(
        torch.tensor([3.0]), torch.tensor(0.0), torch.tensor(8.0), torch.tensor(3.0)
    )
    torch.testing.assert_close(at_threshold, torch.tensor([0.5]))


def test_scores_pass_unchanged_before_validation() -> None:
    scores = torch.tensor([0.3, 7.0])
    result = RankPreservingPostProcessor()(InferenceBatch(pred_score=scores, anomaly_map=scores[:, None, None]))
    assert torch.equal(result.pred_score, scores)
