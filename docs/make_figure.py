"""Draw docs/adtr.png, the README's picture: ADTR's heat maps and score histogram after ``make demo``'s training.

Trains exactly as ``adtr-anomalib demo`` does (built-in brick textures, 256x256, Lite0, 4 epochs; minutes on a
CPU), predicts the test set and plots one good image and the first image of every defect type (not picked for
looks) next to the scores of all test images. The PNG is stored with a 256-colour palette to stay small.

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
from PIL import Image

from adtr_anomalib import ADTR
from adtr_anomalib.__main__ import run_demo
from adtr_anomalib.data import default_dataset_root, make_texture_dataset, mvtec_layout_folder
from adtr_anomalib.plotting import Predictions, plot_heatmaps, plot_score_histogram


def main() -> None:
    """Train, predict, draw and save the figure; print the demo's metrics for the caption."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("adtr.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as results:
        result = run_demo(output=Path(results))
        checkpoint = next(Path(result["results_dir"]).rglob("*.ckpt"))
        model = ADTR.load_from_checkpoint(checkpoint, weights_only=True)
        datamodule = mvtec_layout_folder(make_texture_dataset(default_dataset_root(), "brick"), eval_batch_size=16)
        engine = Engine(default_root_dir=results, logger=False, enable_progress_bar=False)
        predictions = Predictions.from_batches(engine.predict(model=model, datamodule=datamodule))
    print({key: round(float(result[key]), 3) for key in ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO")})

    picks = predictions.pick()
    figure = plt.figure(figsize=(2.1 * len(picks) + 3.6, 4.4), dpi=80)
    grid = figure.add_gridspec(2, len(picks) + 2)
    axes = [figure.add_subplot(grid[row, column]) for row in (0, 1) for column in range(len(picks))]
    plot_heatmaps(predictions, picks, axes=axes)
    plot_score_histogram(predictions, ax=figure.add_subplot(grid[:, len(picks) :]), title="All test images")
    figure.tight_layout()
    figure.savefig(args.output)
    Image.open(args.output).convert("RGB").quantize(256).save(args.output, optimize=True)
    print(f"{args.output}: {args.output.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
