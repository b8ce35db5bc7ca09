"""ADTR+ losses: learn from labelled anomalies.

With ``d = f - f_hat`` the difference between the backbone features and their reconstruction:

* error per position, the pseudo-Huber of the channel-mean absolute difference:
  ``phi(u) = sqrt(((1/C) sum_i |d(i, u)|)^2 + 1) - 1``
* pixel labels ``y(u)`` on the feature grid:
  ``L_px = (1/HW) sum_u (1 - y(u)) phi(u) - alpha * log(1 - exp(-(1/HW) sum_u y(u) phi(u)))``
* image labels ``y``, with ``q`` the mean of the ``k`` largest ``phi(u)``:
  ``L_img = (1 - y) q - alpha * y * log(1 - exp(-q))``

The first term pulls normal regions toward a good reconstruction; the second pushes anomalous regions away,
with a push that grows without bound as their error goes to zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Smallest argument given to log(1 - exp(-x)). At 1e-6 the push term is -alpha * log(1e-6) ~ 0.04 for the
# default alpha, large enough to dominate and small enough to stay finite in fp32 with its gradient.
EPS = 1e-6


def pseudo_huber_error(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """``phi(u)``: pseudo-Huber of the channel-mean absolute difference, ``(B, C, h, w) -> (B, h, w)``.

    Computed as ``m * (m / (hypot(m, 1) + 1))``, equal to ``sqrt(m^2 + 1) - 1``: it neither cancels to 0 for small
    ``m`` nor overflows for large ``m`` (``m^2`` is inf above ~1.8e19 in fp32).

    Args:
        features: ``(B, C, h, w)`` backbone features.
        reconstruction: Their reconstruction, the same shape.

    Returns:
        The ``(B, h, w)`` error ``phi`` at each position.
    """
    mean_abs = (features - reconstruction).abs().mean(dim=1)
    return mean_abs * (mean_abs / (torch.hypot(mean_abs, torch.ones_like(mean_abs)) + 1.0))


def log_one_minus_exp_neg(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``log(1 - exp(-x))`` computed as ``log(-expm1(-x))`` with ``x`` clamped to at least ``eps``.

    ``1 - exp(-x)`` loses every digit for small ``x`` and is 0 at ``x = 0``; ``expm1`` keeps them, and the
    clamp keeps the value and its gradient finite (the gradient through the clamp is 0 below ``eps``).

    Args:
        x: Non-negative values; smaller ones than ``eps`` are raised to it.
        eps: Smallest argument used, which keeps the result finite.

    Returns:
        ``log(1 - exp(-x))`` element by element, always negative.
    """
    return torch.log(-torch.expm1(-x.clamp_min(eps)))


def masks_to_token_labels(
    masks: torch.Tensor,
    grid: tuple[int, int] | torch.Size,
    threshold: float | None = None,
) -> torch.Tensor:
    """Bring pixel masks down to the feature grid: ``(B, H, W)`` or ``(B, 1, H, W)`` -> ``(B, h, w)`` in {0, 1}.

    A token is anomalous when the fraction of anomalous pixels in its cell is at least ``threshold``
    (adaptive average pooling, then ``>=``). ``threshold=None`` means "any anomalous pixel" (adaptive max
    pooling): defects are often much smaller than a 16x16 cell and would otherwise vanish. Cells follow
    ``adaptive_*_pool2d``: exact ``H/h x W/w`` blocks when the sizes divide, slightly overlapping otherwise.

    Args:
        masks: Binary pixel masks, 1 = anomalous.
        grid: ``(h, w)`` of the feature grid.
        threshold: Fraction of anomalous pixels that makes a token anomalous; ``None``: any anomalous pixel.

    Returns:
        ``(B, h, w)`` float token labels.

    Raises:
        ValueError: If ``masks`` has neither shape.
    """
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    if masks.ndim != 4 or masks.shape[1] != 1:
        msg = f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}."
        raise ValueError(msg)
    masks = masks.float()
    size = (int(grid[0]), int(grid[1]))
    if threshold is None:
        return F.adaptive_max_pool2d(masks, size).squeeze(1)
    return (F.adaptive_avg_pool2d(masks, size) >= threshold).float().squeeze(1)


class ADTRPlusLoss(nn.Module):
    """``L_px`` and ``L_img`` of ADTR+, per image, on the pseudo-Huber error map.

    Args:
        alpha: Weight of the term that pushes anomalies away. Paper: 0.003.
        k: Number of largest errors averaged into the image score ``q`` of ``L_img``. Paper (CIFAR-10): 20.
            Capped at the number of feature positions.
    """

    def __init__(self, alpha: float = 0.003, k: int = 20) -> None:
        super().__init__()
        if not alpha > 0:
            msg = f"alpha must be > 0 (weight of the anomaly term), got {alpha}."
            raise ValueError(msg)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"k must be a positive integer (number of top errors in L_img), got {k!r}."
            raise ValueError(msg)
        self.alpha = float(alpha)
        self.k = k

    def pixel_loss(self, error: torch.Tensor, token_labels: torch.Tensor) -> torch.Tensor:
        """``L_px`` for each image: ``(B, h, w)`` errors and labels in {0, 1} -> ``(B,)``.

        The anomaly term only exists for images with at least one anomalous token: for a normal image its
        argument is 0 and ``-log(1 - exp(0))`` is infinite, so that term is dropped there, not clamped.

        Args:
            error: ``phi`` from :func:`pseudo_huber_error`.
            token_labels: Labels on the feature grid, e.g. from :func:`masks_to_token_labels`.

        Returns:
            ``L_px`` of each image.
        """
        labels = token_labels.to(error.dtype)
        normal_term = ((1.0 - labels) * error).mean(dim=(-2, -1))
        anomalous_mean = (labels * error).mean(dim=(-2, -1))
        has_anomaly = labels.flatten(1).amax(dim=1) > 0
        push = -self.alpha * log_one_minus_exp_neg(anomalous_mean)
        return normal_term + torch.where(has_anomaly, push, torch.zeros_like(push))

    def image_loss(self, error: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``L_img`` for each image: ``(B, h, w)`` errors and image labels in {0, 1} -> ``(B,)``.

        Args:
            error: ``phi`` from :func:`pseudo_huber_error`.
            labels: Image labels, 1 = anomalous.

        Returns:
            ``L_img`` of each image.
        """
        flat = error.flatten(1)
        q = flat.topk(min(self.k, flat.shape[1]), dim=1).values.mean(dim=1)
        y = labels.to(error.dtype)
        return (1.0 - y) * q - self.alpha * y * log_one_minus_exp_neg(q)

    def forward(
        self,
        error: torch.Tensor,
        labels: torch.Tensor,
        token_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean loss over the batch.

        Args:
            error: ``phi`` of shape ``(B, h, w)`` (see :func:`pseudo_huber_error`).
            labels: Image labels ``(B,)``, 1 = anomalous.
            token_labels: Labels on the feature grid ``(B, h, w)`` for ``L_px``; ``None`` gives ``L_img``.
                An image labelled anomalous whose mask is empty at feature resolution (a defect lost in
                resizing, or a label without a mask) gets ``L_img``: its normal term would otherwise pull the
                defect toward a good reconstruction.

        Returns:
            The scalar loss.
        """
        image_loss = self.image_loss(error, labels)
        if token_labels is None:
            return image_loss.mean()
        pixel_loss = self.pixel_loss(error, token_labels)
        unlocated = (labels > 0) & (token_labels.flatten(1).amax(dim=1) <= 0)
        return torch.where(unlocated, image_loss, pixel_loss).mean()
