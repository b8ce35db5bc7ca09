"""ADTR reconstruction loss ``L_norm``."""

from __future__ import annotations

import torch
from torch import nn

from .components.settings import LossReduction


class ADTRLoss(nn.Module):
    """Feature reconstruction loss for normal-only training.

    ``reduction="sum"`` is the paper's ``L_norm = 1/(HW) * sum_u ||f(:,u) - f_hat(:,u)||^2``: squared error
    summed over channels, averaged over positions and images. ``"mean"`` also averages over channels, like
    UniAD's ``MSELoss``; it is ``C`` times smaller, which matters together with gradient clipping.
    """

    def __init__(self, reduction: LossReduction = "sum") -> None:
        super().__init__()
        if reduction not in {"sum", "mean"}:
            msg = f"loss_reduction must be 'sum' (paper) or 'mean' (UniAD), got {reduction!r}."
            raise ValueError(msg)
        self.reduction = reduction

    def forward(self, features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Loss over ``(B, C, h, w)`` feature maps.

        Args:
            features: Backbone features, the target.
            reconstruction: The reconstructor's output, the same shape.

        Returns:
            The scalar loss.
        """
        squared = (features - reconstruction).pow(2)
        per_position = squared.sum(dim=1) if self.reduction == "sum" else squared.mean(dim=1)
        return per_position.mean()
