"""Figures for the notebooks and the README: heat maps over the images, and score histograms with the threshold.

anomalib's visualizer writes one file per test image. A reader deciding whether a model works wants a few
images side by side and the score distribution of the whole test set, so these draw those with matplotlib
(``pip install "adtr-anomalib[notebooks]"``). Scores and maps are expected post-processed (anomalib's min-max
normalisation to [0, 1], threshold 0.5), as ``Engine.predict`` and anomalib's inferencers return them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
except ImportError as error:  # matplotlib is not a dependency of the models themselves
    msg = 'adtr_anomalib.plotting needs matplotlib: pip install "adtr-anomalib[notebooks]"'
    raise ImportError(msg) from error

__all__ = ["Predictions", "load_image", "plot_heatmaps", "plot_score_histogram", "save_with_palette"]


@dataclass
class Predictions:
    """One test set's predictions as arrays: what the plots need, gathered from anomalib's batches."""

    image_paths: list[str]
    scores: np.ndarray  # (N,) normalised image scores
    anomaly_maps: np.ndarray  # (N, H, W) normalised anomaly maps
    labels: np.ndarray | None = None  # (N,) ground truth, 1 = anomalous
    masks: np.ndarray | None = None  # (N, H, W) ground-truth masks, bool
    pred_masks: np.ndarray | None = None  # (N, H, W) the post-processor's predicted masks, bool

    @classmethod
    def from_batches(cls, batches: Iterable[Any], image_paths: Sequence[str | Path] | None = None) -> Predictions:
        """Concatenate the batches of ``Engine.predict`` or of an inferencer (which needs ``image_paths``).

        Args:
            batches: Prediction batches with ``pred_score`` and ``anomaly_map``, and ground truth where known.
            image_paths: The images' paths in batch order; ``None`` takes them from the batches.

        Returns:
            The predictions; ``labels`` and ``masks`` are ``None`` unless every batch has them.

        Raises:
            ValueError: If the batches hold no anomaly maps.
        """
        batches = list(batches)

        def gather(field: str) -> np.ndarray | None:
            values = [getattr(batch, field, None) for batch in batches]
            if any(value is None for value in values):
                return None
            return np.concatenate([_numpy(value) for value in values])

        if image_paths is None:
            image_paths = [path for batch in batches for path in batch.image_path]
        paths = [str(path) for path in image_paths]
        maps = gather("anomaly_map")
        if maps is None:
            msg = "The batches hold no anomaly maps."
            raise ValueError(msg)
        masks = gather("gt_mask")
        pred_masks = gather("pred_mask")
        return cls(
            image_paths=paths,
            scores=gather("pred_score").reshape(len(paths)),
            anomaly_maps=maps.reshape(len(paths), *maps.shape[-2:]),
            labels=None if (labels := gather("gt_label")) is None else labels.reshape(len(paths)).astype(int),
            masks=None if masks is None else masks.reshape(len(paths), *masks.shape[-2:]).astype(bool),
            pred_masks=None if pred_masks is None else pred_masks.reshape(len(paths), *maps.shape[-2:]).astype(bool),
        )

    def pick(self, per_folder: int = 1) -> list[int]:
        """Indices of the first ``per_folder`` images of each image folder, ``good`` first: every defect type shown.

        Args:
            per_folder: Images to take from each folder.

        Returns:
            Indices into the predictions.
        """
        folders = [Path(path).parent.name for path in self.image_paths]
        order = dict.fromkeys(["good", *sorted(set(folders))])
        return [i for name in order for i in [j for j, f in enumerate(folders) if f == name][:per_folder]]


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def load_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The image file as RGB at the anomaly map's (height, width), for drawing the map over it.

    Args:
        path: Image file.
        size: ``(height, width)`` of the anomaly map.

    Returns:
        A ``(height, width, 3)`` ``uint8`` array.
    """
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))


def plot_heatmaps(
    predictions: Predictions,
    indices: Sequence[int] | None = None,
    threshold: float = 0.5,
    titles: Sequence[str] | None = None,
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """One column per image: the photo with its ground-truth outline, and the anomaly map over it.

    The map is drawn with a fixed 0-1 colour range, so colours compare across images and models; the white
    outline is the ground truth and the black one the predicted defect: the post-processor's ``pred_mask`` where the
    predictions hold it (so outlines follow its pixel threshold and gating), else the map above ``threshold``. The
    title gives the image score and the decision.

    Args:
        predictions: The test set's predictions.
        indices: Images to show; ``None`` takes :meth:`Predictions.pick`.
        threshold: Decision threshold on the normalised scores and maps.
        titles: Column titles; ``None`` uses each image's folder name.
        axes: ``2 * len(indices)`` axes, top row first; ``None`` makes a new figure.

    Returns:
        The figure holding the axes.
    """
    indices = list(predictions.pick() if indices is None else indices)
    if axes is None:
        _, grid = plt.subplots(2, len(indices), figsize=(2.2 * len(indices), 4.6), squeeze=False)
        axes = [*grid[0], *grid[1]]
    figure = axes[0].figure
    size = predictions.anomaly_maps.shape[-2:]
    for column, index in enumerate(indices):
        image = load_image(predictions.image_paths[index], size)
        top, bottom = axes[column], axes[len(indices) + column]
        score = float(predictions.scores[index])
        verdict = "anomalous" if score > threshold else "normal"
        top.imshow(image)
        top.set_title(titles[column] if titles else Path(predictions.image_paths[index]).parent.name)
        bottom.imshow(image)
        bottom.imshow(predictions.anomaly_maps[index], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        outline = (
            predictions.anomaly_maps[index] > threshold
            if predictions.pred_masks is None
            else predictions.pred_masks[index]
        )
        if outline.any():
            bottom.contour(outline, levels=[0.5], colors="black", linewidths=1)
        if predictions.masks is not None and predictions.masks[index].any():
            for ax in (top, bottom):
                ax.contour(predictions.masks[index], levels=[0.5], colors="white", linewidths=1)
        bottom.set_title(f"score {score:.2f}: {verdict}", color="red" if verdict == "anomalous" else "green")
        for ax in (top, bottom):
            ax.set_axis_off()
    figure.tight_layout()
    return figure


def plot_score_histogram(
    predictions: Predictions,
    threshold: float = 0.5,
    ax: Axes | None = None,
    title: str = "Image scores",
) -> Axes:
    """Histograms of the image scores of normal and of anomalous test images, with the decision threshold.

    Args:
        predictions: The test set's predictions; without labels, one histogram of all scores.
        threshold: Decision threshold, drawn as a dashed line.
        ax: Axes to draw on; ``None`` makes a new figure.
        title: Axes title.

    Returns:
        The axes drawn on.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    bins = np.linspace(0.0, 1.0, 21)
    if predictions.labels is None:
        ax.hist(predictions.scores, bins=bins, color="grey", label="all images")
    else:
        for label, name, colour in ((0, "good", "tab:green"), (1, "defect", "tab:red")):
            scores = predictions.scores[predictions.labels == label]
            ax.hist(scores, bins=bins, alpha=0.6, color=colour, label=f"{name} ({len(scores)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("normalised image score")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return ax


def save_with_palette(path: str | Path) -> int:
    """Re-save a PNG figure with a 256-colour palette: plots have few colours, and the file shrinks severalfold.

    Args:
        path: The PNG to rewrite in place.

    Returns:
        The new file size in bytes.
    """
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256)
    small.save(path, optimize=True)
    return Path(path).stat().st_size
