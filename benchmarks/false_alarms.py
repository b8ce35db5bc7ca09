"""What the predicted masks outline: false-alarm area on good images and defects found, for each pixel threshold rule.

A heat map is judged by its outline. anomalib's pixel threshold maximises F1 on the validation anomalies; with
held-back validation those are synthetic, and the threshold can sit inside the normal texture's range, so good
images get outlined too. The alternative is a high quantile of the normal validation images' maps
(``RankPreservingPostProcessor(pixel_normal_quantile=q)``). Both rules see validation images only, never the test set.
Each rule is also measured with outlines that follow the image decision (``masks_follow_labels=True``: no outline on
an image whose score is below the image threshold), for two image thresholds: anomalib's F1 threshold on the
validation anomalies and the highest score of the normal validation images (``image_normal_quantile=1``).

Trains ADTR as ``make demo`` does (recipe and step budget of the demo, built-in brick textures, Lite0, thresholds
from 10% held-back training images with synthetic anomalies) and PaDiM on the same data, predicts the validation and
test images, and for each rule reports on the test images:

- ``good_flagged_pct`` and ``defects_flagged_pct``: share of good and of defective images judged anomalous;
- ``good_area_pct``: mean share of a good image's pixels outlined;
- ``good_clean_pct``: share of good images with nothing outlined;
- ``defect_pixels_pct``: share of defect pixels outlined;
- ``regions_found_pct``: share of defect regions (connected parts of the masks) with at least a quarter outlined.

The sigmoid of the post-processor preserves order, so every rule is applied to the normalised maps.

``--data FOLDER`` measures a data set in MVTec layout instead of the built-in brick (BSData: the configs' own case).
``--validation test_folder`` takes the validation images from half of the test folder instead (anomalib's ``Folder``
default; they leave the test set), so the thresholds see good images taken as the test images were.

Run:  python benchmarks/false_alarms.py [--seeds 0 1] [--validation held_back] [--output FILE.csv]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from scipy import ndimage

from adtr_anomalib.__main__ import DEMO_RECIPE, DEMO_STEPS
from adtr_anomalib.benchmark.models import build_model
from adtr_anomalib.benchmark.report import seed_spread
from adtr_anomalib.data import (
    HELD_OUT_VALIDATION,
    TEST_FOLDER_VALIDATION,
    default_dataset_root,
    make_texture_dataset,
    mvtec_layout_folder,
)
from adtr_anomalib.models.adtr.components.training import step_budget
from adtr_anomalib.plotting import Predictions

BACKBONE = "tf_efficientnet_lite0"
QUANTILES = (0.99, 0.999, 0.9999)
FOUND_SHARE = 0.25  # a defect region counts as found when this share of its pixels is outlined


VALIDATIONS = {"held_back": HELD_OUT_VALIDATION, "test_folder": TEST_FOLDER_VALIDATION}


def _fit_and_predict(
    name: str, seed: int, root: Path, results: Path, validation: str
) -> tuple[Predictions, Predictions]:
    seed_everything(seed, workers=True)
    split = VALIDATIONS[validation]
    datamodule = mvtec_layout_folder(root, train_batch_size=16, eval_batch_size=16, seed=seed, **split)
    options = {"recipe": DEMO_RECIPE} if name == "adtr" else {}
    model = build_model(name, backbone=BACKBONE, image_size=256, **options)
    length = step_budget(DEMO_STEPS) if name == "adtr" else {"max_epochs": 1}
    engine = Engine(**length, default_root_dir=results, logger=False, enable_progress_bar=False, deterministic="warn")
    engine.fit(model=model, datamodule=datamodule)
    validation = Predictions.from_batches(engine.predict(model=model, dataloaders=datamodule.val_dataloader()))
    test = Predictions.from_batches(engine.predict(model=model, dataloaders=datamodule.test_dataloader()))
    return validation, test


def outline_statistics(test: Predictions, threshold: float, image_threshold: float | None = None) -> dict[str, float]:
    """The outline statistics of the module docstring for one pixel threshold on the normalised maps; with an
    ``image_threshold`` (on the normalised scores), only images above it are outlined."""
    outlined = test.anomaly_maps > threshold
    flagged = test.scores > (0.5 if image_threshold is None else image_threshold)
    if image_threshold is not None:
        outlined &= flagged[:, None, None]
    good = test.labels == 0
    regions_found = []
    for index in np.flatnonzero(~good):
        regions, count = ndimage.label(test.masks[index])
        for region in range(1, count + 1):
            regions_found.append(outlined[index][regions == region].mean() >= FOUND_SHARE)
    return {
        "good_flagged_pct": 100 * float(flagged[good].mean()),
        "defects_flagged_pct": 100 * float(flagged[~good].mean()),
        "good_area_pct": 100 * float(outlined[good].mean()),
        "good_clean_pct": 100 * float((~outlined[good].any(axis=(1, 2))).mean()),
        "defect_pixels_pct": 100 * float(outlined[~good][test.masks[~good]].mean()),
        "regions_found_pct": 100 * float(np.mean(regions_found)),
    }


def image_rules(validation: Predictions) -> dict[str, float]:
    """Each image rule's threshold on the normalised scores: anomalib's F1 threshold (0.5 after normalisation) and
    the highest normal validation score."""
    return {
        "F1 on validation anomalies": 0.5,
        "normal maximum": float(validation.scores[validation.labels == 0].max()),
    }


# (image rule, outlines follow the image decision): the ungated outlines depend on no image rule, so once.
COMBINATIONS = (("F1 on validation anomalies", False), ("F1 on validation anomalies", True), ("normal maximum", True))


def rules(validation: Predictions) -> dict[str, float]:
    """Each rule's threshold on the normalised maps: anomalib's F1 threshold (0.5 after normalisation) and the
    quantiles of the normal validation images' maps."""
    normal = validation.anomaly_maps[validation.labels == 0].ravel()
    return {
        "F1 on validation anomalies": 0.5,
        **{f"normal quantile {q}": float(np.quantile(normal, q)) for q in QUANTILES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=["adtr", "padim"])
    parser.add_argument(
        "--validation",
        choices=sorted(VALIDATIONS),
        default="held_back",
        help="thresholds from 10%% held-back training images with synthetic anomalies, or from half of the test folder",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="a folder in MVTec layout instead of the built-in brick"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/false_alarms.csv"))
    args = parser.parse_args()
    root = make_texture_dataset(default_dataset_root(), "brick") if args.data is None else args.data
    rows = []
    for name in args.models:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as results:
                validation, test = _fit_and_predict(name, seed, root, Path(results), args.validation)
            image_thresholds = image_rules(validation)
            for (rule, threshold), (image_rule, follow) in itertools.product(rules(validation).items(), COMBINATIONS):
                row = {
                    "model": name,
                    "seed": seed,
                    "rule": rule,
                    "image_rule": image_rule,
                    "masks_follow_labels": follow,
                }
                statistics = outline_statistics(test, threshold, image_thresholds[image_rule] if follow else None)
                rows.append({**row, "threshold": threshold, **statistics})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False, float_format="%.4f")
    columns = [
        "good_flagged_pct",
        "defects_flagged_pct",
        "good_area_pct",
        "good_clean_pct",
        "defect_pixels_pct",
        "regions_found_pct",
    ]
    header = "| model | pixel rule | image rule | masks follow labels | " + " | ".join(columns) + " |"
    lines = [header, "|---|---|---|---|" + "---|" * len(columns)]
    keys = ["model", "rule", "image_rule", "masks_follow_labels"]
    for (name, rule, image_rule, follow), group in table.groupby(keys, sort=False):
        cells = [f"{group[c].mean():.2f} ± {seed_spread(group[c]):.2f}" for c in columns]
        lines.append(f"| {name} | {rule} | {image_rule} | {'yes' if follow else 'no'} | " + " | ".join(cells) + " |")
    markdown = args.output.with_suffix(".md")
    data = "" if args.data is None else f" --data {args.data}"
    command = f"python benchmarks/false_alarms.py --validation {args.validation}{data}"
    markdown.write_text(f"Mean ± sample std over seeds {args.seeds}; `{command}`.\n\n")
    with markdown.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
