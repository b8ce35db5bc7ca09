"""The notebooks' figures: predictions gathered in order, one image per folder, scores and threshold drawn."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adtr_anomalib.plotting import Predictions, plot_heatmaps, plot_score_histogram
from tests.helpers import save_image


@pytest.fixture
def predictions(tmp_path: Path) -> Predictions:
    """Two predict batches over good/hole/scratch images, with channel axes as anomalib returns them."""
    folders = ["scratch", "good", "hole", "good", "scratch"]
    paths = [save_image(tmp_path / f / f"{i}.png", np.full((16, 16, 3), i, np.uint8)) for i, f in enumerate(folders)]
    maps = torch.rand(5, 1, 8, 8)
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True

    def batch(rows: slice) -> SimpleNamespace:
        return SimpleNamespace(
            image_path=[str(p) for p in paths[rows]],
            pred_score=torch.tensor([0.9, 0.1, 0.7, 0.4, 0.6])[rows],
            anomaly_map=maps[rows],
            gt_label=torch.tensor([1, 0, 1, 0, 1])[rows],
            gt_mask=masks[rows],
        )

    gathered = Predictions.from_batches([batch(slice(0, 3)), batch(slice(3, 5))])
    np.testing.assert_array_equal(gathered.anomaly_maps, maps[:, 0].numpy())
    return gathered


def test_batches_are_gathered_in_order(predictions: Predictions) -> None:
    np.testing.assert_allclose(predictions.scores, [0.9, 0.1, 0.7, 0.4, 0.6])
    np.testing.assert_array_equal(predictions.labels, [1, 0, 1, 0, 1])
    assert predictions.masks.dtype == bool
    assert predictions.masks.shape == (5, 8, 8)
    assert predictions.masks[0].sum() == 4


def test_inferencer_batches_take_their_paths_separately() -> None:
    batch = SimpleNamespace(pred_score=np.array([0.3]), anomaly_map=np.zeros((1, 1, 8, 8)), pred_label=np.array([0]))
    gathered = Predictions.from_batches([batch], image_paths=[Path("part.png")])
    assert gathered.image_paths == ["part.png"]
    assert gathered.labels is None
    assert gathered.masks is None


def test_pick_shows_good_first_then_each_defect_type_once(predictions: Predictions) -> None:
    assert predictions.pick() == [1, 2, 0]
    assert predictions.pick(per_folder=2) == [1, 3, 2, 0, 4]


def test_heatmaps_give_score_and_decision_per_image(predictions: Predictions) -> None:
    figure = plot_heatmaps(predictions, [1, 0], threshold=0.5)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["good", "scratch", "score 0.10: normal", "score 0.90: anomalous"]


def test_histogram_separates_good_and_defect_and_marks_the_threshold(predictions: Predictions) -> None:
    ax = plot_score_histogram(predictions, threshold=0.3)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["good (2)", "defect (3)", "threshold 0.3"]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.3, 0.3]


def test_outlines_are_the_post_processor_s_masks_where_the_batches_hold_them(predictions: Predictions) -> None:
    """The black outline is ``pred_mask`` when the batches have it (gated masks stay empty), else map > threshold."""
    assert predictions.pred_masks is None
    loud = np.ones_like(predictions.anomaly_maps)
    by_threshold = plot_heatmaps(Predictions(predictions.image_paths, predictions.scores, loud), [1], threshold=0.5)
    gated = Predictions(predictions.image_paths, predictions.scores, loud, pred_masks=np.zeros_like(loud, dtype=bool))
    by_mask = plot_heatmaps(gated, [1], threshold=0.5)
    assert len(by_threshold.axes[1].collections) == 1  # the predicted outline over the whole map
    assert len(by_mask.axes[1].collections) == 0  # nothing outlined on the image judged normal


def test_predicted_masks_are_gathered_at_the_map_s_size() -> None:
    pred_mask = np.zeros((2, 1, 8, 8), dtype=bool)
    pred_mask[1, 0, 3, 3] = True
    batch = SimpleNamespace(pred_score=np.array([0.3, 0.8]), anomaly_map=np.zeros((2, 1, 8, 8)), pred_mask=pred_mask)
    gathered = Predictions.from_batches([batch], image_paths=["a.png", "b.png"])
    assert gathered.pred_masks.shape == (2, 8, 8)
    assert gathered.pred_masks.sum(axis=(1, 2)).tolist() == [0, 1]
