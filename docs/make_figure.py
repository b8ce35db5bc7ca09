"""Draw docs/adtr.png, the README's picture: ADTR's heat maps and score histogram after ``make demo``'s training.

Trains exactly as ``adtr-anomalib demo`` does (built-in brick textures, 256x256, Lite0, its default recipe and
optimiser steps; minutes on a CPU), predicts the test set and plots one good image and the first
image of every defect type (not picked for looks) next to the scores of all test images. The PNG is stored with a
256-colour palette to stay small. The demo's metrics, and what the picture's outlines and verdicts amount to over the
whole test set, quoted in the README's caption, are appended to ``docs/adtr_metrics.csv`` with the date, commit and
machine.

Run:  python docs/make_figure.py [--output docs/adtr.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
from anomalib.engine import Engine

from adtr_anomalib import ADTR
from adtr_anomalib.__main__ import run_demo
from adtr_anomalib.benchmark.measure import provenance
from adtr_anomalib.benchmark.report import append_csv
from adtr_anomalib.data import TEST_FOLDER_VALIDATION, default_dataset_root, make_texture_dataset, mvtec_layout_folder
from adtr_anomalib.plotting import Predictions, plot_heatmaps, plot_score_histogram, save_with_palette
from adtr_anomalib.post_processing import inspection_post_processor


def main() -> None:
    """Train, predict, draw and save the figure; print the demo's metrics for the caption."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("adtr.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as results:
        result = run_demo(output=Path(results))
        checkpoint = next(Path(result["results_dir"]).rglob("*.ckpt"))
        # The demo's post-processor and test split: a checkpoint restores anomalib's default post-processor, and the
        # test folder's other half (same seed) was the demo's validation.
        model = ADTR.load_from_checkpoint(checkpoint, weights_only=True, post_processor=inspection_post_processor())
        root = make_texture_dataset(default_dataset_root(), "brick")
        datamodule = mvtec_layout_folder(root, eval_batch_size=16, seed=0, **TEST_FOLDER_VALIDATION)
        engine = Engine(default_root_dir=results, logger=False, enable_progress_bar=False)
        predictions = Predictions.from_batches(engine.predict(model=model, datamodule=datamodule))
    metrics = {
        key: round(float(result[key]), 3) for key in ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO")
    }
    outlines = outline_statistics(predictions)
    print(metrics, outlines)
    record_metrics(
        args.output.with_name("adtr_metrics.csv"), {**metrics, **outlines, "fit_s": round(result["fit_seconds"])}
    )

    picks = predictions.pick()
    figure = plt.figure(figsize=(2.1 * len(picks) + 3.6, 4.4), dpi=80)
    grid = figure.add_gridspec(2, len(picks) + 2)
    axes = [figure.add_subplot(grid[row, column]) for row in (0, 1) for column in range(len(picks))]
    plot_heatmaps(predictions, picks, axes=axes)
    plot_score_histogram(predictions, ax=figure.add_subplot(grid[:, len(picks) :]), title="All test images")
    figure.tight_layout()
    figure.savefig(args.output)
    print(f"{args.output}: {save_with_palette(args.output) // 1024} KB")


def outline_statistics(predictions: Predictions) -> dict[str, float]:
    """What a user sees on the test images: the share of good images judged anomalous, the share of their area
    outlined, and the share of defective images judged anomalous (percent)."""
    good = predictions.labels == 0
    flagged = predictions.scores > 0.5
    return {
        "good_flagged_pct": round(100 * float(flagged[good].mean()), 1),
        "good_area_pct": round(100 * float(predictions.pred_masks[good].mean()), 2),
        "defects_flagged_pct": round(100 * float(flagged[~good].mean()), 1),
    }


def record_metrics(path: Path, metrics: dict[str, float]) -> None:
    """Append the demo's metrics with date, commit and machine; earlier rows stay."""
    append_csv([{**provenance(), **metrics}], path)


if __name__ == "__main__":
    main()
