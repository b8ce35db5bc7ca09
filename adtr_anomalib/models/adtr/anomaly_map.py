"""ADTR anomaly map and image score (paper eq. 3)."""

from __future__ import annotations

from collections.abc import Callable

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
        return _per_image(
            distance, lambda maps: F.interpolate(maps, tuple(image_size), mode="bilinear", align_corners=True)
        )

    def compute_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Maximum of the average-pooled map, one value per image.

        Args:
            anomaly_map: ``(B, 1, H, W)`` map from :meth:`compute_anomaly_map`.

        Returns:
            ``(B,)`` image scores.
        """
        # Two 1-D means equal the square one and cost 2k instead of k**2 additions per pixel: the square pool took
        # a tenth of OpenVINO's time at batch 16.
        kernel = self.pooling_kernel
        pooled = _per_image(
            anomaly_map, lambda maps: F.avg_pool2d(F.avg_pool2d(maps, (kernel, 1), stride=1), (1, kernel), stride=1)
        )
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


def _per_image(maps: torch.Tensor, operation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a per-channel ``operation`` to ``(B, 1, H, W)`` maps with the images as channels of one sample.

    The same result; but OpenVINO pads channels to blocks of 16 on CPU, so a one-channel map costs 16 times its
    size there, and resizing and pooling the maps took a fifth of the exported model's time at batch 16.

    Args:
        maps: One-channel maps.
        operation: A resize or pooling that treats channels independently.

    Returns:
        ``operation``'s result, ``(B, 1, H', W')``.
    """
    result = operation(maps.reshape(1, -1, *maps.shape[2:]))
    return result.reshape(-1, 1, *result.shape[2:])
