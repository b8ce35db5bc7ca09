"""RankPreservingPostProcessor: anomalib's thresholds and labels, without the clamp that ties test scores."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
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


def _validate_scores(anomaly: float) -> torch.Tensor:
    """The image scores of :func:`_validate`'s images: 8 normal, then 8 anomalous."""
    return _validation_batch(anomaly).pred_score


def _validation_batch(anomaly: float) -> ImageBatch:
    """8 normal images (maps uniform in [0, 1]) and 8 synthetic anomalies, whose masked square reads ``anomaly`` and
    whose background reads like a normal image."""
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 1, 32, 32, generator=generator)
    masks = torch.zeros(16, 32, 32, dtype=torch.bool)
    masks[8:, 8:16, 8:16] = True
    maps[:, 0][masks] = anomaly
    labels = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    return ImageBatch(
        image=torch.zeros(16, 3, 32, 32),
        gt_label=labels,
        gt_mask=masks,
        anomaly_map=maps,
        pred_score=maps.flatten(1).amax(1),
    )


def _validate(post_processor: PostProcessor, anomaly: float = 5.0) -> PostProcessor:
    """One validation pass over :func:`_validation_batch`."""
    post_processor.on_validation_batch_end(None, None, _validation_batch(anomaly))
    post_processor.on_validation_epoch_end(None, None)
    return post_processor


def test_pixel_threshold_from_normal_images_bounds_the_area_outlined_on_them() -> None:
    """With pixel_normal_quantile, the pixel threshold is that quantile of the normal images' maps (about 0.1% of a
    good image's pixels lie above 0.999), whatever the validation anomalies look like; anomalib's F1 threshold (the
    control) follows the anomalies."""
    for anomaly in (5.0, 0.9):
        threshold = _validate(RankPreservingPostProcessor(pixel_normal_quantile=0.999), anomaly).pixel_threshold
        assert float(threshold) == pytest.approx(0.999, abs=0.002)  # uniform normal maps: the quantile is q itself
    strong, weak = (float(_validate(RankPreservingPostProcessor(), anomaly).pixel_threshold) for anomaly in (5.0, 0.9))
    assert strong == pytest.approx(5.0)
    assert weak < 0.95  # inside the normal range: it outlines part of every good image
    # The image threshold stays anomalib's F1 on the image scores.
    torch.testing.assert_close(
        _validate(RankPreservingPostProcessor(pixel_normal_quantile=0.999)).image_threshold,
        _validate(RankPreservingPostProcessor()).image_threshold,
    )


def test_pixel_normal_quantile_is_checked_and_kept_in_checkpoints() -> None:
    with pytest.raises(ValueError, match=r"pixel_normal_quantile must lie in \(0, 1\]"):
        RankPreservingPostProcessor(pixel_normal_quantile=99.9)
    with pytest.raises(ValueError, match=r"image_normal_quantile must lie in \(0, 1\]"):
        RankPreservingPostProcessor(image_normal_quantile=0.0)
    config = RankPreservingPostProcessor(pixel_normal_quantile=0.999).checkpoint_config()
    assert config["pixel_normal_quantile"] == 0.999
    restored = RankPreservingPostProcessor()
    restored.load_checkpoint_config(config)
    assert float(_validate(restored).pixel_threshold) == pytest.approx(0.999, abs=0.002)


def _two_images() -> tuple[InferenceBatch, ImageBatch]:
    """Two images with one hot pixel each: the first scores below the image threshold (3), the second above."""
    maps = torch.zeros(2, 1, 4, 4)
    maps[:, 0, 1, 1] = 5.0  # above the pixel threshold on both images
    scores = torch.tensor([1.0, 6.0])
    batch = ImageBatch(image=torch.zeros(2, 3, 4, 4), anomaly_map=maps.clone(), pred_score=scores.clone())
    return InferenceBatch(pred_score=scores, anomaly_map=maps), batch


@pytest.mark.parametrize("follow", [False, True])
def test_masks_follow_labels_empties_the_outlines_of_images_judged_normal(follow: bool) -> None:
    """With masks_follow_labels a passed image has no outline, a failed one keeps anomalib's; without it (the
    control) both keep theirs. The same in the exported forward and in the Lightning callbacks."""
    inference, batch = _two_images()
    post_processor = _fitted(RankPreservingPostProcessor(masks_follow_labels=follow), low=0.0, high=8.0, threshold=3.0)
    result = post_processor(inference)
    post_processor.post_process_batch(batch)
    for pred_label, pred_mask in ((result.pred_label, result.pred_mask), (batch.pred_label, batch.pred_mask)):
        assert pred_label.tolist() == [False, True]
        assert pred_mask.reshape(2, -1).sum(1).tolist() == [0 if follow else 1, 1]
    assert RankPreservingPostProcessor(masks_follow_labels=True).checkpoint_config()["masks_follow_labels"] is True


def test_image_threshold_from_normal_images_flags_none_of_them_at_quantile_one() -> None:
    """With image_normal_quantile=1 the image threshold is the highest normal validation score, whatever the
    anomalies; anomalib's F1 threshold (the control) drops to the weakest anomaly when the anomalies are faint, and then
    flags normal images too."""
    for anomaly in (5.0, 0.9):
        post_processor = _validate(RankPreservingPostProcessor(image_normal_quantile=1.0), anomaly)
        highest_normal = float(_validate_scores(anomaly)[:8].max())
        assert float(post_processor.image_threshold) == pytest.approx(highest_normal)
    faint = float(_validate(RankPreservingPostProcessor(), anomaly=0.9).image_threshold)
    assert faint < float(_validate_scores(0.9)[:8].max())  # inside the normal range: flags good images
    config = RankPreservingPostProcessor(image_normal_quantile=1.0).checkpoint_config()
    assert config["image_normal_quantile"] == 1.0
