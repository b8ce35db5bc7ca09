"""Numerics: losses and anomaly maps stay finite on extreme inputs (property-based), and
training that diverges stops with a clear message instead of saving a NaN model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.anomaly_map import AnomalyMapGenerator
from adtr_anomalib.models.adtr.loss import ADTRLoss
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from adtr_anomalib.models.adtr_plus.loss import ADTRPlusLoss, pseudo_huber_error
from tests.conftest import TINY
from tests.helpers import make_folder, tiny_adtr, tiny_engine

# Reproducible examples, no timing limit (a slow shared CPU is not a failure), nothing written to the repo.
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
# Largest magnitude whose paper loss (squared error summed over 8 channels) is still a float32 number; beyond
# it the true value is inf, and training stops with FloatingPointError (see the divergence test below).
SQUARED_BOUND = 1e15
# Largest magnitude used for the map and ADTR+: differences stay finite (float32 max is 3.4e38).
BOUND = 1e30


def _floats(bound: float) -> st.SearchStrategy[float]:
    bound = float(np.float32(bound))  # hypothesis wants bounds that float32 represents exactly
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def feature_pairs(draw: st.DrawFn, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and reconstructions ``(B, C, h, w)``: huge, tiny (subnormal included) and zero values mixed,
    and sometimes a perfect reconstruction (zero difference everywhere)."""
    shape = draw(st.tuples(st.integers(1, 2), st.integers(1, 8), st.integers(1, 4), st.integers(1, 4)))
    elements = st.one_of(st.just(0.0), _floats(bound), _floats(1e-30))
    features = draw(arrays(np.float32, shape, elements=elements))
    reconstruction = draw(st.one_of(st.just(features.copy()), arrays(np.float32, shape, elements=elements)))
    return torch.from_numpy(features), torch.from_numpy(reconstruction).requires_grad_(True)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@PROPERTY
@given(pair=feature_pairs(SQUARED_BOUND), reduction=st.sampled_from(["sum", "mean"]))
def test_adtr_loss_is_finite_on_extreme_features(pair: tuple[torch.Tensor, torch.Tensor], reduction: str) -> None:
    features, reconstruction = pair
    loss = ADTRLoss(reduction)(features, reconstruction)
    loss.backward()
    assert _finite(loss, reconstruction.grad)
    assert loss >= 0


@PROPERTY
@given(pair=feature_pairs(BOUND), upscale=st.integers(1, 4), kernel=st.integers(1, 4))
def test_anomaly_map_and_score_are_finite_on_extreme_features(
    pair: tuple[torch.Tensor, torch.Tensor], upscale: int, kernel: int
) -> None:
    features, reconstruction = pair
    height, width = features.shape[-2] * upscale, features.shape[-1] * upscale
    generator = AnomalyMapGenerator(pooling_kernel=min(kernel, height, width))
    with torch.no_grad():
        anomaly_map, score = generator(features, reconstruction, (height, width))
        distance = generator.compute_distance(features, reconstruction)
    assert _finite(anomaly_map, score)
    assert anomaly_map.shape == (features.shape[0], 1, height, width)
    assert (anomaly_map >= 0).all()
    assert (score <= anomaly_map.flatten(1).amax(dim=1) * (1 + 1e-5)).all()  # an average never exceeds the max
    # Still the L2 norm, computed without overflow (float64 reference; subnormal results round to ~1e-45).
    reference = torch.linalg.vector_norm(features.double() - reconstruction.detach().double(), dim=1, keepdim=True)
    torch.testing.assert_close(distance.double(), reference, rtol=1e-5, atol=1e-37)


@PROPERTY
@given(
    pair=feature_pairs(BOUND),
    data=st.data(),
    k=st.integers(1, 30),
    alpha=st.floats(1e-6, 10.0),
    pixel=st.booleans(),
)
def test_adtr_plus_losses_are_finite_on_extreme_features(
    pair: tuple[torch.Tensor, torch.Tensor], data: st.DataObject, k: int, alpha: float, pixel: bool
) -> None:
    features, reconstruction = pair
    batch, _, height, width = features.shape
    token_labels = torch.from_numpy(data.draw(arrays(np.bool_, (batch, height, width)))).float()
    labels = torch.from_numpy(data.draw(arrays(np.bool_, (batch,)))).float()
    error = pseudo_huber_error(features, reconstruction)
    loss = ADTRPlusLoss(alpha=alpha, k=k)(error, labels, token_labels if pixel else None)
    loss.backward()
    assert _finite(error, loss, reconstruction.grad)
    assert (error >= 0).all()
    assert loss >= 0
    # phi = sqrt(m^2 + 1) - 1, in a form without cancellation, compared in float64 where m^2 cannot overflow.
    m = (features.double() - reconstruction.detach().double()).abs().mean(dim=1)
    torch.testing.assert_close(error.detach().double(), m * m / (torch.sqrt(m * m + 1) + 1), rtol=1e-5, atol=1e-37)


@pytest.fixture(scope="module")
def random_model() -> ADTRModel:
    return ADTRModel("tf_efficientnet_lite0", ["blocks.1", "blocks.2"], pre_trained=False, input_size=(32, 32), **TINY)


@PROPERTY
@given(
    images=st.one_of(
        _floats(1e4).map(lambda value: torch.full((1, 3, 32, 32), value)),  # blank, saturated, far out of range
        arrays(np.float32, (2, 3, 32, 32), elements=_floats(1e4)).map(torch.from_numpy),  # extreme noise
    )
)
def test_model_scores_and_training_loss_are_finite_on_extreme_images(
    random_model: ADTRModel, images: torch.Tensor
) -> None:
    random_model.eval()
    with torch.no_grad():
        output = random_model(images)
    random_model.train()
    loss = ADTRLoss()(*random_model(images))
    random_model.eval()
    assert _finite(output.anomaly_map, output.pred_score, loss)


# --- divergence ----------------------------------------------------------------------------------------------


def test_diverging_training_stops_with_clear_message_and_saves_no_model(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    engine = tiny_engine(tmp_path / "results", max_epochs=2)
    model = tiny_adtr(pre_trained=False, lr=1e30)  # one AdamW step makes every weight ~1e30
    with pytest.raises(FloatingPointError, match=r"diverged at step 1: the loss is NaN or infinite\. Lower `lr`"):
        engine.fit(model, datamodule=mvtec_layout_folder(root, train_batch_size=4))
    assert not list((tmp_path / "results").rglob("*.ckpt"))


def test_non_finite_gradient_stops_before_the_optimizer_step() -> None:
    model = tiny_adtr(pre_trained=False)
    for parameter in model.model.reconstructor.parameters():
        parameter.grad = torch.zeros_like(parameter)
    model.on_before_optimizer_step(optimizer=None)  # finite gradients pass
    parameter.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="a gradient of the transformer is NaN or infinite"):
        model.on_before_optimizer_step(optimizer=None)
