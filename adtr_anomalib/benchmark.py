"""Side-by-side comparison of ADTR with anomalib's PaDiM and PatchCore on one dataset.

Fairness rules: every model gets the same datamodule (same split), the same input size and normalisation,
the same backbone weights (loaded through :func:`load_backbone_weights`, so offline Lite0 works for all),
and the same metrics (:func:`inspection_evaluator`), all in one process.

Run ``python -m adtr_anomalib.benchmark --help``. PatchCore needs ``MALLOC_MMAP_THRESHOLD_=1048576`` on small
CPU machines (glibc heap fragmentation); the command sets it and re-executes itself when it is missing.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anomalib.engine import Engine
from anomalib.models import Padim, Patchcore
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything

from adtr_anomalib.data import default_dataset_root, make_texture_dataset, mvtec_layout_folder
from adtr_anomalib.metrics import inspection_evaluator
from adtr_anomalib.models import ADTR
from adtr_anomalib.models.components import load_backbone_weights

METRICS = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO")
# Stages of EfficientNet-family backbones that mirror the ResNet stages anomalib uses by default:
# PaDiM layer1-3 (strides 4/8/16), PatchCore layer2-3 (strides 8/16).
PADIM_LAYERS = ("blocks.1", "blocks.2", "blocks.4")
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _with_backbone_weights(model: AnomalibModule, backbone: str, weights: str | None) -> AnomalibModule:
    """Load the shared backbone weights into an anomalib model built with ``pre_trained=False``."""
    load_backbone_weights(model.model.feature_extractor.feature_extractor, backbone, weights)
    return model


def build_model(
    name: str,
    backbone: str = "tf_efficientnet_lite0",
    image_size: int = 256,
    weights: str | None = None,
    **options: Any,
) -> AnomalibModule:
    """Build ``adtr``, ``padim`` or ``patchcore`` with the shared backbone, weights and pre-processing."""
    pre_processor = ADTR.configure_pre_processor((image_size, image_size), backbone=backbone)
    common = {"pre_processor": pre_processor, "evaluator": inspection_evaluator()}
    builders: dict[str, Callable[[], AnomalibModule]] = {
        "adtr": lambda: ADTR(backbone=backbone, weights=weights, **common, **options),
        "padim": lambda: _with_backbone_weights(
            Padim(backbone=backbone, layers=list(PADIM_LAYERS), pre_trained=False, n_features=100, **common),
            backbone,
            weights,
        ),
        "patchcore": lambda: _with_backbone_weights(
            Patchcore(
                backbone=backbone,
                layers=PATCHCORE_LAYERS,
                pre_trained=False,
                coreset_sampling_ratio=options.get("coreset_sampling_ratio", 0.01),
                **common,
            ),
            backbone,
            weights,
        ),
    }
    if name not in builders:
        msg = f"Unknown model {name!r}; choose from {sorted(builders)}."
        raise ValueError(msg)
    return builders[name]()


def run_job(model: AnomalibModule, datamodule: Any, epochs: int, output: Path) -> dict[str, Any]:
    """Fit and test one model; return its metrics and timings."""
    # Validate once, after the last epoch: validation only feeds the post-processor's normalisation statistics,
    # and with val = test it would otherwise cost more than training.
    engine = Engine(max_epochs=epochs, check_val_every_n_epoch=max(epochs, 1), default_root_dir=output, logger=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    return {**{k: float(metrics[k]) for k in METRICS}, "fit_s": fit_seconds, "test_s": time.perf_counter() - start}


def _cell(column: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if column.endswith("_s") else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a Markdown table (columns from the first row); metrics with three decimals, seconds with none."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], folder: Path) -> Path:
    """Write ``rows`` to ``folder/results.csv``, or ``results_<n>.csv`` if that exists: earlier results are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / "results.csv", 1
    while path.exists():
        path, n = folder / f"results_{n}.csv", n + 1
    with path.open("x", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adtr_anomalib.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="MVTec-layout folder (default: built-in 'brick' textures)")
    parser.add_argument("--models", nargs="+", default=["adtr", "padim", "patchcore"], help="models to run")
    parser.add_argument("--epochs", type=int, default=10, help="ADTR training epochs (default %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-4, help="ADTR learning rate (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore coreset (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"), help="results and CSV folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print a Markdown table; also writes ``<output>/results.csv``."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, "-m", "adtr_anomalib.benchmark", *(argv or sys.argv[1:])],
                  {**os.environ, **MALLOC_ENV})  # fmt: skip
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.data if args.data is not None else make_texture_dataset(default_dataset_root(), "brick")
    rows = []
    for name in args.models:
        seed_everything(args.seed, workers=True)
        datamodule = mvtec_layout_folder(root, train_batch_size=args.batch_size, eval_batch_size=args.batch_size)
        options = {
            "adtr": {"lr": args.lr, "lr_schedule": "cosine"},
            "patchcore": {"coreset_sampling_ratio": args.coreset_ratio},
        }
        options = options.get(name, {})
        model = build_model(name, args.backbone, args.image_size, **options)
        epochs = args.epochs if name == "adtr" else 1
        result = run_job(model, datamodule, epochs, args.output)
        rows.append({"model": name, **result, "epochs": epochs})
        print(markdown_table(rows[-1:]), flush=True)
    csv_path = write_csv(rows, args.output)
    print(f"\n{markdown_table(rows)}\n\nCSV: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
