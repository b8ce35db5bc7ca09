"""Statistics of features and anomaly maps over the training images: sums in float64, over processes in a
distributed run, so that they do not depend on batching or sharding."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

# Buffers of the model that hold the per-channel feature statistics (``normalize_features``).
FEATURE_STATISTICS: tuple[str, ...] = ("feature_mean", "feature_std", "feature_statistics_fitted")
# Buffers of the model that hold the per-pixel statistics of the training images' anomaly maps (``normalize_map``).
MAP_STATISTICS: tuple[str, ...] = ("map_mean", "map_std", "map_statistics_fitted")
# Sums a tensor over the processes of a distributed run (identity in one process): statistics fitted on each
# process's shard of the training set then equal those of the whole set.
SumReduce = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def per_pixel_statistics(
    maps: Iterable[torch.Tensor], reduce: SumReduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over images of batches of ``(B, K, H, W)`` maps, each ``(K, H, W)``.

    Sums in float64, so the result does not depend on batching; ``reduce`` sums them over processes. The deviation
    has a floor of 0.1% of its mean: a pixel where every normal map agrees (a flat background) must not turn noise
    into huge scores.

    Args:
        maps: Batches of ``(B, K, H, W)`` anomaly maps.
        reduce: Sums a tensor over processes; ``None`` in a single process.

    Returns:
        The per-pixel mean and floored standard deviation, ``(K, H, W)`` each, in float32.

    Raises:
        ValueError: If there are fewer than 2 images in all.
    """
    count, mean, std = moments(maps, dims=(0,), reduce=reduce)
    if count < 2:
        msg = f"map statistics need at least 2 normal training images for a standard deviation, got {count}."
        raise ValueError(msg)
    std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
    return mean.float(), std.float()


@torch.no_grad()
def moments(
    batches: Iterable[torch.Tensor], dims: tuple[int, ...], reduce: SumReduce | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and standard deviation of batches over ``dims`` (the statistics of features and of maps).

    Sums of values and squares in float64, so the result does not depend on batching; ``reduce`` sums them over
    processes, where each has seen its own shard.

    Args:
        batches: Tensors of one shape but for the sizes along ``dims``.
        dims: The dimensions summed over (images and, for per-channel statistics, positions).
        reduce: Sums a tensor over processes; ``None`` in a single process.

    Returns:
        The number of values summed per entry (0 for no batches), the mean and the population standard deviation,
        float64, of the shape without ``dims`` (empty tensors for no batches).
    """
    count = torch.zeros((), dtype=torch.float64)
    first: torch.Tensor | float = 0.0
    second: torch.Tensor | float = 0.0
    for batch in batches:
        values = batch.double()
        count += math.prod(values.shape[d] for d in dims)
        first = first + values.sum(dim=dims)
        second = second + values.pow(2).sum(dim=dims)
    if not isinstance(first, torch.Tensor):
        return 0, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    if reduce is not None:
        count, first, second = (reduce(value) for value in (count, first, second))
    mean = first / count.to(first.device)
    std = (second / count.to(first.device) - mean.pow(2)).clamp_min(0).sqrt()
    return int(count), mean, std
