"""The comparison helpers: every model gets the same backbone weights and pre-processing."""

from __future__ import annotations

import pytest
import torch

from adtr_anomalib.benchmark import build_model, markdown_table
from adtr_anomalib.models.components import offline_weights_file


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_baselines_get_the_offline_lite0_weights_and_backbone_normalisation(name: str) -> None:
    model = build_model(name, image_size=64)
    packaged = torch.load(offline_weights_file("tf_efficientnet_lite0"), weights_only=True)
    stem = model.model.feature_extractor.feature_extractor.conv_stem.weight
    torch.testing.assert_close(stem, packaged["_conv_stem.weight"])
    normalize = model.pre_processor.transform.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]


def test_unknown_model_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'fastflow'; choose from \['adtr', 'padim', 'patchcore'\]"):
        build_model("fastflow")


def test_markdown_table_formats_metrics_and_seconds() -> None:
    table = markdown_table([{"model": "adtr", "pixel_AUROC": 0.97654, "fit_s": 12.6, "epochs": 3}])
    assert table.splitlines() == [
        "| model | pixel_AUROC | fit_s | epochs |",
        "|---|---|---|---|",
        "| adtr | 0.977 | 13 | 3 |",
    ]


def test_results_csv_never_overwrites_earlier_results(tmp_path) -> None:
    from adtr_anomalib.benchmark import write_csv

    first = write_csv([{"model": "adtr", "pixel_AUROC": 0.9}], tmp_path)
    second = write_csv([{"model": "padim", "pixel_AUROC": 0.8}], tmp_path)
    assert (first.name, second.name) == ("results.csv", "results_1.csv")
    assert "adtr" in first.read_text()
    assert "padim" in second.read_text()
