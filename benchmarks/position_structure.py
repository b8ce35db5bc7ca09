"""How much a part's appearance depends on where in the image one looks, from its normal training images alone.

Surfaces look alike everywhere; an object in a fixed pose does not: its label is always here and its cap always
there. The share of each feature channel's variance that lies between image positions (the per-position means'
variance, as a fraction of the channel's total variance over images and positions) measures it: near 0 for a
stationary surface, large for a posed object. It needs no anomaly, so a model could choose its recipe by it; this
script only measures it on the development sets (Lite0 features at stride 16, each channel standardised over the
training images, as ADTR's ``normalize_features`` does).

    python benchmarks/position_structure.py --output benchmarks/results/position_structure.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the data sets are the sibling convergence.py's
from convergence import BACKBONE, DATASETS, SHARED_DATA, dataset_root

from adtr_anomalib import ADTR
from adtr_anomalib.benchmark.measure import provenance
from adtr_anomalib.benchmark.report import append_csv
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.torch_model import ADTRModel

# The development sets of benchmarks/convergence.py and the bottles (image labels only, so not in the curves).
ROOTS = {**{name: dataset_root for name in DATASETS}, "bottle": lambda _: SHARED_DATA / "bottle"}


def training_features(root: Path) -> torch.Tensor:
    """Standardised stride-16 Lite0 features of the training images of an MVTec-layout folder, ``(N, C, h, w)``."""
    datamodule = mvtec_layout_folder(root, train_batch_size=32)
    datamodule.setup()
    transform = ADTR.configure_pre_processor((256, 256), backbone=BACKBONE).transform
    model = ADTRModel(backbone=BACKBONE, normalize_features=True).eval()
    raw = [model.backbone_features(transform(batch.image)) for batch in datamodule.train_dataloader()]
    model.fit_feature_statistics(raw)
    return torch.cat([model.standardize(features) for features in raw])


def between_position_share(features: torch.Tensor) -> float:
    """Mean over channels of the variance of the per-position means, over the channel's total variance.

    Args:
        features: ``(N, C, h, w)`` training features.

    Returns:
        A share in [0, 1]: 0 when every position has the same mean, 1 when images differ only by position.
    """
    flat = features.double().flatten(2)  # (N, C, P)
    total = flat.var(dim=(0, 2), unbiased=False)
    between = flat.mean(dim=0).var(dim=1, unbiased=False)
    return float((between / total.clamp_min(1e-12)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(ROOTS), choices=list(ROOTS))
    parser.add_argument("--output", type=Path, default=None, help="append the rows to this CSV")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        features = training_features(ROOTS[name](name))
        share = between_position_share(features)
        rows.append({"dataset": name, "train_images": len(features), "between_position_share": round(share, 4)})
        print(f"{name}: {share:.4f} of the feature variance lies between positions ({len(features)} images)")
    if args.output is not None:
        append_csv([{**row, **provenance()} for row in rows], args.output)


if __name__ == "__main__":
    main()
