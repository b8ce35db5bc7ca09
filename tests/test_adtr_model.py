"""ADTR's torch model: shapes, and the paper's equations computed directly."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch
from torch.nn import functional as F  # noqa: N812

from adtr_anomalib import ADTR
from adtr_anomalib.models.adtr.loss import ADTRLoss
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.conftest import TINY

SIZE = (64, 96)


@pytest.fixture(scope="module")
def model() -> ADTRModel:
    return ADTRModel("tf_efficientnet_lite0", pre_trained=False, input_size=SIZE, pooling_kernel=8, **TINY).eval()


def test_inference_output_shapes_and_types(model: ADTRModel) -> None:
    out = model(torch.rand(3, 3, *SIZE))
    assert isinstance(out, InferenceBatch)
    assert out.anomaly_map.shape == (3, 1, *SIZE)
    assert out.pred_score.shape == (3,)
    assert out.anomaly_map.dtype == out.pred_score.dtype == torch.float32
    assert torch.isfinite(out.anomaly_map).all()


def test_training_output_is_features_and_reconstruction(model: ADTRModel) -> None:
    model.train()
    try:
        features, reconstruction = model(torch.rand(2, 3, *SIZE))
    finally:
        model.eval()
    # Lite0 stages 1-5: 16 + 24 + 40 + 112 + 320 channels on the stride-16 grid.
    assert features.shape == reconstruction.shape == (2, 512, SIZE[0] // 16, SIZE[1] // 16)
    assert reconstruction.requires_grad
    assert not features.requires_grad


def test_anomaly_map_is_l2_norm_of_feature_difference(model: ADTRModel) -> None:
    images = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        features = model.extract_features(images)
        reconstruction = model.reconstruct(features)
        out = model(images)
    diff = features - reconstruction
    expected = torch.sqrt((diff**2).sum(dim=1, keepdim=True))  # eq. 3 at every feature position
    expected = F.interpolate(expected, size=SIZE, mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.anomaly_map, expected, rtol=1e-5, atol=1e-5)
    # align_corners=True keeps the grid's corner values exactly.
    torch.testing.assert_close(out.anomaly_map[:, 0, 0, 0], torch.linalg.norm(diff[:, :, 0, 0], dim=1))


def test_image_score_is_max_of_average_pooled_map(model: ADTRModel) -> None:
    with torch.no_grad():
        out = model(torch.rand(2, 3, *SIZE))
    k = model.anomaly_map_generator.pooling_kernel
    windows = out.anomaly_map.unfold(2, k, 1).unfold(3, k, 1)  # every k x k window, stride 1
    expected = windows.mean(dim=(-1, -2)).flatten(1).max(dim=1).values
    torch.testing.assert_close(out.pred_score, expected)


def test_loss_matches_spec_formula() -> None:
    features, reconstruction = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    # L_norm = 1/(HW) * sum_u ||f(:,u) - f_hat(:,u)||^2, averaged over the batch.
    per_image = [
        sum(
            float(torch.sum((features[b, :, i, j] - reconstruction[b, :, i, j]) ** 2))
            for i in range(3)
            for j in range(4)
        )
        / 12
        for b in range(2)
    ]
    expected = sum(per_image) / 2
    assert ADTRLoss("sum")(features, reconstruction).item() == pytest.approx(expected, rel=1e-5)
    assert ADTRLoss("mean")(features, reconstruction).item() == pytest.approx(expected / 5, rel=1e-5)


def test_wrong_input_size_is_refused_clearly(model: ADTRModel) -> None:
    with pytest.raises(ValueError, match=r"built for 64x96 inputs but got 64x64"):
        model(torch.rand(1, 3, 64, 64))


def test_defaults_are_the_papers() -> None:
    adtr = ADTR(pre_trained=False)
    assert adtr.hparams.backbone == "efficientnet_b4"
    assert list(adtr.hparams.layers) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert adtr.model.num_channels == 720  # 24 + 32 + 56 + 160 + 448
    assert adtr.model.feature_grid == (16, 16)  # 256 / 16
    reconstructor = adtr.model.reconstructor
    assert len(reconstructor.encoder) == len(reconstructor.decoder) == 4
    assert reconstructor.input_proj.out_features == 256
    attention = reconstructor.encoder[0].self_attn
    assert attention.num_heads == 8
    assert attention.dropout == pytest.approx(0.1)
    assert reconstructor.encoder[0].ffn.net[0].out_features == 1024
    assert reconstructor.query_embed.shape == (1, 256, 256)
    assert adtr.model.anomaly_map_generator.pooling_kernel == 16
    assert adtr.loss.reduction == "sum"
    assert (adtr.settings.lr, adtr.settings.weight_decay, adtr.settings.lr_schedule) == (1e-4, 1e-4, "step")


def test_normalisation_comes_from_the_backbone() -> None:
    lite = ADTR(backbone="tf_efficientnet_lite0", pre_trained=False)
    b4 = ADTR(pre_trained=False)
    lite_norm, b4_norm = lite.pre_processor.transform.transforms[-1], b4.pre_processor.transform.transforms[-1]
    assert list(lite_norm.mean) == [0.5, 0.5, 0.5]
    assert list(b4_norm.mean) == pytest.approx([0.485, 0.456, 0.406])
    assert lite.input_size == (256, 256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "no_such_net"}, r"Unknown backbone 'no_such_net'"),
        ({"layers": ["blocks.0", "blocks.9"]}, r"layers \['blocks.9'\] do not exist"),
        ({"hidden_dim": 30, "num_heads": 4}, r"hidden_dim \(30\) must be divisible by num_heads \(4\)"),
        ({"pooling_kernel": 300}, r"pooling_kernel \(300\)"),
        ({"lr_schedule": "linear"}, r"lr_schedule must be"),
        ({"loss_reduction": "max"}, r"loss_reduction must be"),
        ({"lr": 0.0}, r"lr must be a finite number > 0"),
        ({"lr": float("nan")}, r"lr must be a finite number > 0"),
        ({"weight_decay": -1e-4}, r"weight_decay one >= 0"),
        ({"reconstructor": "lstm"}, r"reconstructor must be one of \['transformer', 'no_query', 'mlp', 'cnn'\]"),
        ({"reconstructor": "cnn", "patch_size": 8}, r"reconstructor 'cnn' .* multiples of 4; got 2x2"),
        ({"attention_dropout": "heads"}, r"attention_dropout must be one of \['weights', 'keys'\], got 'heads'"),
        ({"neighbor_mask": 4}, r"neighbor_mask must be 0 \(off\) or an odd number"),
        ({"neighbor_mask": 17}, r"neighbor_mask \(17\) covers the whole token grid 16x16"),
        ({"attention_locality": -1.0}, r"attention_locality must be a finite number >= 0"),
        ({"attention_locality": 1.0, "reconstructor": "mlp"}, r"bias attention, which reconstructor 'mlp' has none"),
    ],
    ids=[
        "unknown backbone",
        "stage the backbone does not have",
        "hidden size not divisible by head count",
        "pooling kernel larger than the map",
        "unknown lr schedule",
        "unknown loss reduction",
        "zero lr",
        "NaN lr",
        "negative weight decay",
        "unknown reconstructor",
        "token grid too small for the CNN",
        "unknown attention dropout",
        "even neighbourhood mask",
        "neighbourhood mask covering the grid",
        "negative locality",
        "locality without attention",
    ],
)
def test_bad_configuration_is_rejected_up_front(kwargs: dict, message: str) -> None:
    options = {"backbone": "tf_efficientnet_lite0", "pre_trained": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        ADTR(**options)
