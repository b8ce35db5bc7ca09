"""ADTR anomaly map and image score (paper eq. 3)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class AnomalyMapGenerator(nn.Module):
    """Turn features and their reconstruction into a pixel anomaly map and an image score.

    The map is ``s(u) = ||f(:, u) - f_hat(:, u)||_2`` on the feature grid, up-sampled bilinearly to the
    image (no smoothing, as in the paper). The image score is the maximum of the map average-pooled with a
    ``pooling_kernel`` window at stride 1, which ignores single hot pixels but keeps small defects.

    Args:
        pooling_kernel: Side of the averaging window on the up-sampled map, in pixels.
    """

    def __init__(self, pooling_kernel: int = 16) -> None:
        super().__init__()
        self.pooling_kernel = pooling_kernel

    @staticmethod
    def compute_distance(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Per-position L2 distance over channels: ``(B, C, h, w) -> (B, 1, h, w)``.

        Scaled by the largest difference first: ``vector_norm`` squares its input, which overflows to inf for
        differences above ~1e19 in fp32 (a diverged model). No branches, so it still exports.

        Args:
            features: Backbone features.
            reconstruction: Their reconstruction, the same shape.

        Returns:
            The distance at each position of the feature grid.
        """
        difference = features - reconstruction
        scale = difference.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(difference.dtype).tiny)
        return scale * torch.linalg.vector_norm(difference / scale, ord=2, dim=1, keepdim=True)

    def compute_anomaly_map(
        self,
        features: torch.Tensor,
        reconstruction: torch.Tensor,
        image_size: tuple[int, int] | torch.Size,
    ) -> torch.Tensor:
        """Distance map up-sampled to ``image_size``.

        Args:
            features: ``(B, C, h, w)`` backbone features.
            reconstruction: Their reconstruction, the same shape.
            image_size: ``(H, W)`` of the map.

        Returns:
            The ``(B, 1, H, W)`` anomaly map.
        """
        distance = self.compute_distance(features, reconstruction)
        return F.interpolate(distance, size=tuple(image_size), mode="bilinear", align_corners=True)

    def compute_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Maximum of the average-pooled map, one value per image.

        Args:
            anomaly_map: ``(B, 1, H, W)`` map from :meth:`compute_anomaly_map`.

        Returns:
            ``(B,)`` image scores.
        """
        pooled = F.avg_pool2d(anomaly_map, kernel_size=self.pooling_kernel, stride=1)
        return pooled.amax(dim=(1, 2, 3))

    def forward(
        self,
        features: torch.Tensor,
        reconstruction: torch.Tensor,
        image_size: tuple[int, int] | torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(anomaly_map (B, 1, H, W), pred_score (B,))``.

        Args:
            features: ``(B, C, h, w)`` backbone features.
            reconstruction: Their reconstruction, the same shape.
            image_size: ``(H, W)`` of the anomaly map.

        Returns:
            The anomaly map and the image scores.
        """
        anomaly_map = self.compute_anomaly_map(features, reconstruction, image_size)
        return anomaly_map, self.compute_score(anomaly_map)
