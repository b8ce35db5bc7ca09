"""Synthetic anomalies made on the fly: FCDD's confetti noise, and a dataset that applies any generator.

ADTR+ on MVTec-AD trains on normal images with simple synthetic defects pasted in (paper: "confetti
noise", from FCDD, Liznerski et al., ICLR 2021, https://arxiv.org/abs/2007.01760). anomalib ships only
Perlin-noise anomalies (:class:`anomalib.data.utils.generators.PerlinAnomalyGenerator`), so confetti noise
is written here, with the same call convention: ``image (C, H, W) -> (image, mask (1, H, W))``; either
generator (or both) can be given to :class:`AnomalyInjectionDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from anomalib.data import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

AnomalyGenerator = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = ["AnomalyGenerator", "AnomalyInjectionDataset", "ConfettiNoise"]


class ConfettiNoise(v2.Transform):
    """Paste a few small rectangles of random colour onto an image; the mask is the pasted area.

    Each rectangle has one uniformly random colour (each channel in ``[0, 1]``, the range of anomalib's
    images before normalisation), a random position fully inside the image, and sides drawn uniformly from
    ``size`` as fractions of the image's height and width, so the amount does not depend on the resolution.
    Random numbers come from torch's global generator, so ``seed_everything`` (and Lightning's per-worker
    seeding) make runs reproducible.

    Args:
        probability: Chance that an image gets confetti at all.
        num_rectangles: Inclusive ``(min, max)`` number of rectangles per image.
        size: Inclusive ``(min, max)`` side of a rectangle as a fraction of the image side; at least 1 pixel.

    Example:
        >>> import torch
        >>> image, mask = ConfettiNoise(probability=1.0)(torch.rand(3, 64, 64))
        >>> image.shape, mask.shape, bool(mask.any())
        (torch.Size([3, 64, 64]), torch.Size([1, 64, 64]), True)
    """

    def __init__(
        self,
        probability: float = 0.5,
        num_rectangles: tuple[int, int] = (1, 4),
        size: tuple[float, float] = (0.03, 0.1),
    ) -> None:
        super().__init__()
        if not 0.0 <= probability <= 1.0:
            msg = f"probability must be in [0, 1], got {probability}."
            raise ValueError(msg)
        low, high = (int(n) for n in num_rectangles)
        if not 1 <= low <= high:
            msg = f"num_rectangles must be (min, max) with 1 <= min <= max, got {tuple(num_rectangles)}."
            raise ValueError(msg)
        small, large = (float(s) for s in size)
        if not 0.0 < small <= large <= 1.0:
            msg = f"size must be (min, max) fractions of the image side with 0 < min <= max <= 1, got {tuple(size)}."
            raise ValueError(msg)
        self.probability = float(probability)
        self.num_rectangles = (low, high)
        self.size = (small, large)

    def _side(self, length: int) -> int:
        fraction = self.size[0] + (self.size[1] - self.size[0]) * torch.rand(1).item()
        return min(length, max(1, round(fraction * length)))

    def _paste(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = image.shape
        mask = torch.zeros(1, height, width, dtype=torch.bool, device=image.device)
        if torch.rand(1).item() >= self.probability:
            return image, mask
        image = image.clone()
        count = int(torch.randint(self.num_rectangles[0], self.num_rectangles[1] + 1, (1,)).item())
        for _ in range(count):
            rect_h, rect_w = self._side(height), self._side(width)
            top = int(torch.randint(0, height - rect_h + 1, (1,)).item())
            left = int(torch.randint(0, width - rect_w + 1, (1,)).item())
            colour = torch.rand(channels, 1, 1).to(device=image.device, dtype=image.dtype)
            image[:, top : top + rect_h, left : left + rect_w] = colour
            mask[:, top : top + rect_h, left : left + rect_w] = True
        return image, mask

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """``(C, H, W) -> (image, mask (1, H, W))`` or ``(B, C, H, W) -> (images, masks (B, 1, H, W))``.

        Args:
            image: One image or a batch, values in ``[0, 1]``.

        Returns:
            The image(s) with confetti, and boolean masks of the pasted area.

        Raises:
            ValueError: If ``image`` has neither 3 nor 4 dimensions.
        """
        if image.ndim == 3:
            return self._paste(image)
        if image.ndim == 4:
            pairs = [self._paste(single) for single in image]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        msg = f"ConfettiNoise expects a (C, H, W) or (B, C, H, W) image, got shape {tuple(image.shape)}."
        raise ValueError(msg)


class AnomalyInjectionDataset(AnomalibDataset):
    """A training dataset whose normal images get synthetic anomalies on the fly, with matching labels.

    It reads the same samples as the dataset it wraps (anomalib's generic ``__getitem__`` works from the
    ``samples`` table for every image dataset), then applies each generator in turn to normal images, after
    the augmentations and the model's resize, so images are in ``[0, 1]`` at the model's resolution. An
    image that received an anomaly gets ``gt_label = 1`` and the union of the generated masks as ``gt_mask``;
    real anomalies already in the data are left alone. The data become segmentation data (normal images get
    empty masks) unless they hold real anomalies without masks: a batch cannot mix images with and without
    masks, so then generated images get labels only.

    anomalib's ``SyntheticAnomalyDataset`` is no substitute: it writes a fixed set of Perlin anomalies to
    disk once, for validation and test sets; training needs fresh anomalies every epoch.

    Args:
        dataset: The training dataset to wrap.
        generators: Callables ``image (C, H, W) -> (image, mask (1, H, W))``, e.g. :class:`ConfettiNoise`
            or ``PerlinAnomalyGenerator``; each decides by its own ``probability`` whether to act.
    """

    # The same image path gives a different image every epoch: ADTR's feature cache must stay off.
    varies_between_epochs = True

    def __init__(self, dataset: AnomalibDataset, generators: Sequence[AnomalyGenerator]) -> None:
        super().__init__(augmentations=dataset.augmentations)
        generators = list(generators)
        if not generators:
            msg = "generators is empty: give at least one synthetic anomaly generator, e.g. ConfettiNoise()."
            raise ValueError(msg)
        self.generators = generators
        self._source_name = dataset.name
        self.category = dataset.category
        samples = dataset.samples.copy()
        samples.attrs = dict(dataset.samples.attrs)
        if not dataset.has_anomalous:
            # Every anomaly will be generated, with its mask: pixel labels exist even for data without masks.
            samples.attrs["task"] = "segmentation"
        self.samples = samples

    @property
    def name(self) -> str:
        """Name of the wrapped dataset.

        Returns:
            The wrapped dataset's ``name``.
        """
        return self._source_name

    def __getitem__(self, index: int) -> ImageItem:
        """The wrapped item, possibly with a synthetic anomaly."""
        item = super().__getitem__(index)
        if item.gt_label is None or bool(item.gt_label):
            return item
        image = torch.as_tensor(item.image)
        mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
        for generator in self.generators:
            image, generated = generator(image)
            mask |= torch.as_tensor(generated).reshape(mask.shape).bool()
        if not mask.any():
            return item
        changes: dict = {"image": tv_tensors.Image(image.clamp(0.0, 1.0)), "gt_label": torch.tensor(True)}
        if item.gt_mask is not None:
            changes["gt_mask"] = tv_tensors.Mask(mask)
        return item.update(**changes)
