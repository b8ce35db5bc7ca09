"""The learning-curve script (``benchmarks/convergence.py``) trains on standardised features and scores each epoch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import convergence


def test_curve_trains_on_standardised_package_features_and_scores_each_epoch(
    tiny_textures_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(convergence, "dataset_root", lambda name: tiny_textures_root)
    recipe = replace(convergence.RECIPES_TRIED["fast_stride8_mlp"], image_size=64)
    train, test = convergence.features_for("brick", recipe, {})

    # Standardised with the statistics of these same training images: per channel, mean 0 and deviation 1.
    channels = train.features.transpose(0, 1).flatten(1)
    assert channels.mean(dim=1).abs().max() < 1e-3
    assert (channels.std(dim=1) - 1).abs().max() < 1e-2
    rows = convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1, 2])
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        for column in ("pixel_AUROC", "pixel_AUPRO", "image_AUROC_pool16_max"):
            assert 0.0 <= row[column] <= 1.0, (column, row[column])
