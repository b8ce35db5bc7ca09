"""ADTR+ losses: values against hand-computed examples, numerical stability, mask down-sampling,
and the direction of one optimisation step."""

import math
import os

import pytest
import torch

from adtr_anomalib.models.adtr_plus.loss import (
    EPS,
    ADTRPlusLoss,
    log_one_minus_exp_neg,
    masks_to_token_labels,
    pseudo_huber_error,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALPHA = 0.003


def _two_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Features/reconstruction (1, C=2, 1, 2) with channel-mean |d| of 4/3 and 3/4: phi = 2/3 and 1/4 exactly.

    sqrt((4/3)^2 + 1) - 1 = 5/3 - 1 = 2/3;  sqrt((3/4)^2 + 1) - 1 = 5/4 - 1 = 1/4.
    """
    features = torch.zeros(1, 2, 1, 2)
    reconstruction = torch.tensor([[1.0, 0.5], [-5 / 3, -1.0]]).reshape(1, 2, 1, 2)  # d = (-1, 5/3), (-0.5, 1)
    return features, reconstruction


def test_pseudo_huber_matches_hand_computation() -> None:
    phi = pseudo_huber_error(*_two_tokens())
    assert phi.shape == (1, 1, 2)
    torch.testing.assert_close(phi, torch.tensor([[[2 / 3, 1 / 4]]]))


def test_pixel_loss_matches_hand_computation() -> None:
    phi = pseudo_huber_error(*_two_tokens())
    loss = ADTRPlusLoss(alpha=ALPHA)
    # y = (0, 1): L_px = (1/2) * 2/3 - alpha * log(1 - exp(-(1/2) * 1/4))
    expected = 0.5 * (2 / 3) - ALPHA * math.log(1 - math.exp(-0.125))
    token_labels = torch.tensor([[[0.0, 1.0]]])
    torch.testing.assert_close(loss.pixel_loss(phi, token_labels), torch.tensor([expected]))
    torch.testing.assert_close(loss(phi, torch.tensor([1.0]), token_labels), torch.tensor(expected))
    # A normal image (no anomalous token) has no anomaly term at all: L_px = mean(phi).
    torch.testing.assert_close(loss.pixel_loss(phi, torch.zeros(1, 1, 2)), torch.tensor([(2 / 3 + 1 / 4) / 2]))
    # All tokens anomalous: only the anomaly term, with x = mean(phi).
    all_anomalous = -ALPHA * math.log(1 - math.exp(-(2 / 3 + 1 / 4) / 2))
    torch.testing.assert_close(loss.pixel_loss(phi, torch.ones(1, 1, 2)), torch.tensor([all_anomalous]))


def test_image_loss_matches_hand_computation() -> None:
    phi = pseudo_huber_error(*_two_tokens())
    top1, top2 = ADTRPlusLoss(alpha=ALPHA, k=1), ADTRPlusLoss(alpha=ALPHA, k=2)
    torch.testing.assert_close(top1.image_loss(phi, torch.tensor([0.0])), torch.tensor([2 / 3]))
    expected = -ALPHA * math.log(1 - math.exp(-2 / 3))
    torch.testing.assert_close(top1.image_loss(phi, torch.tensor([1.0])), torch.tensor([expected]))
    q = (2 / 3 + 1 / 4) / 2  # k = 2: mean of both
    torch.testing.assert_close(top2.image_loss(phi, torch.tensor([0.0])), torch.tensor([q]))
    torch.testing.assert_close(
        top2.image_loss(phi, torch.tensor([1.0])), torch.tensor([-ALPHA * math.log(1 - math.exp(-q))])
    )
    # k larger than the grid is capped; the default k = 20 on a 2-token grid is the mean of both.
    torch.testing.assert_close(ADTRPlusLoss(alpha=ALPHA).image_loss(phi, torch.tensor([0.0])), torch.tensor([q]))
    # forward without token labels is L_img, averaged over the batch.
    batch_phi = torch.cat([phi, phi])
    torch.testing.assert_close(top1(batch_phi, torch.tensor([0.0, 1.0])), torch.tensor((2 / 3 + expected) / 2))


def test_log_one_minus_exp_neg_is_stable() -> None:
    x = torch.tensor([0.0, 1e-30, 1e-8, 1e-3, 1.0, 30.0, 1e4], requires_grad=True)
    value = log_one_minus_exp_neg(x)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value[3:5], torch.log(1 - torch.exp(-x[3:5].detach())))
    assert value[0].item() == value[1].item() == pytest.approx(math.log(EPS), rel=1e-4)  # clamped, not -inf
    assert value[-1].item() == 0.0
    value.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("case", "token_labels", "labels"),
    [
        ("all normal", torch.zeros(3, 4, 4), torch.zeros(3)),
        ("all anomalous", torch.ones(3, 4, 4), torch.ones(3)),
        ("anomalous image, empty mask", torch.zeros(3, 4, 4), torch.ones(3)),
        ("mixed", torch.stack([torch.zeros(4, 4), torch.eye(4), torch.ones(4, 4)]), torch.tensor([0.0, 1.0, 1.0])),
        ("image labels only", None, torch.tensor([0.0, 1.0, 1.0])),
    ],
)
@pytest.mark.parametrize("difference", [0.0, 1e-12, 1.0, 1e4])
def test_loss_is_finite_with_finite_gradients(
    case: str, token_labels: torch.Tensor | None, labels: torch.Tensor, difference: float
) -> None:
    """Zero differences (perfect reconstruction), tiny and huge ones, every kind of batch: finite loss and grads."""
    del case
    features = torch.randn(3, 8, 4, 4)
    reconstruction = (features + difference).requires_grad_(True)
    loss = ADTRPlusLoss()(pseudo_huber_error(features, reconstruction), labels, token_labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(reconstruction.grad).all()


def test_anomalous_image_with_empty_mask_gets_image_loss() -> None:
    """A defect lost when the mask was resized must not be pulled toward a good reconstruction."""
    phi = torch.rand(2, 4, 4)
    loss = ADTRPlusLoss(k=3)
    token_labels = torch.zeros(2, 4, 4)
    labels = torch.tensor([0.0, 1.0])
    expected = torch.stack([loss.pixel_loss(phi, token_labels)[0], loss.image_loss(phi, labels)[1]]).mean()
    torch.testing.assert_close(loss(phi, labels, token_labels), expected)


def test_masks_to_token_labels() -> None:
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 0, 0] = True  # one pixel of the top-left 4x4 cell (1/16 of it)
    masks[0, 4:8, 4:6] = True  # half of the bottom-right cell
    any_pixel = masks_to_token_labels(masks, (2, 2))
    torch.testing.assert_close(any_pixel, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    half = masks_to_token_labels(masks, (2, 2), threshold=0.5)
    torch.testing.assert_close(half, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
    torch.testing.assert_close(masks_to_token_labels(masks, (2, 2), threshold=1 / 16), any_pixel)
    torch.testing.assert_close(masks_to_token_labels(masks.unsqueeze(1), (2, 2)), any_pixel)  # (B, 1, H, W)
    assert masks_to_token_labels(torch.zeros(2, 8, 8), (4, 4)).sum() == 0
    with pytest.raises(ValueError, match="masks must have shape"):
        masks_to_token_labels(torch.zeros(8, 8), (2, 2))


def test_invalid_loss_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ADTRPlusLoss(alpha=0.0)
    with pytest.raises(ValueError, match="k must be"):
        ADTRPlusLoss(k=0)


def test_one_step_on_the_reconstruction_pulls_normal_and_pushes_anomalous_tokens() -> None:
    """Gradient descent on L_px itself: errors of normal tokens go down, of anomalous tokens up."""
    torch.manual_seed(0)
    features = torch.randn(2, 16, 4, 4)
    reconstruction = torch.nn.Parameter(features + 0.05 * torch.randn_like(features))
    token_labels = torch.zeros(2, 4, 4)
    token_labels[1, 1:3, 1:3] = 1.0
    loss_fn = ADTRPlusLoss()
    before = pseudo_huber_error(features, reconstruction).detach()
    loss_fn(pseudo_huber_error(features, reconstruction), torch.tensor([0.0, 1.0]), token_labels).backward()
    torch.optim.SGD([reconstruction], lr=0.5).step()
    after = pseudo_huber_error(features, reconstruction).detach()
    anomalous = token_labels.bool()
    assert (after[~anomalous] < before[~anomalous]).all()
    assert (after[anomalous] > before[anomalous]).all()
