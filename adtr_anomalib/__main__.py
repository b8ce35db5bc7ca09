"""``adtr-anomalib`` command line: the demo (train ADTR on a real sample and show the results), real data sets and
the benchmark.

Training, testing and export of ADTR itself go through anomalib's own CLI (``anomalib train --model ADTR``);
this command only adds what that CLI lacks: a zero-setup run on a built-in dataset, and a model comparison
that fails loudly (``anomalib benchmark`` logs failed jobs and exits 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The recommended training length and recipe (DEFAULT_STEPS and DEFAULT_RECIPE of
# adtr_anomalib.models.adtr.components.settings), written out so that `--help` does not import torch (a test checks).
DEMO_STEPS = 500
DEMO_RECIPE = "fast"
# The names of RECIPES in adtr_anomalib.models.adtr.components.settings, written out so `--help` does not import
# torch (a test checks).
RECIPE_NAMES = ("fast", "fast_stride8", "fast_stride8_local", "fast_stride8_mlp", "paper")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adtr-anomalib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train ADTR on the built-in texture dataset (or your MVTec-layout folder) and report metrics",
        description="Train ADTR, test it, print image AUROC / pixel AUROC / pixel AUPRO and write heat maps.",
    )
    demo.add_argument(
        "data",
        nargs="?",
        type=Path,
        help="folder in MVTec-AD layout (train/good, test/good, test/<defect>, ground_truth/<defect>); "
        "default: the built-in texture dataset, generated on first use",
    )
    demo.add_argument("--category", default="brick", help="built-in texture category (brick, grass, gravel)")
    length = demo.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, help=f"optimiser steps, whatever the data set's size (default {DEMO_STEPS})"
    )
    length.add_argument("--epochs", type=int, help="train this many epochs instead of a number of steps")
    demo.add_argument(
        "--recipe", default=DEMO_RECIPE, choices=RECIPE_NAMES, help="ADTR training recipe (default %(default)s)"
    )
    demo.add_argument("--lr", type=float, help="AdamW learning rate (default: the recipe's)")
    demo.add_argument("--image-size", type=int, default=256, help="square input size (default %(default)s)")
    demo.add_argument("--batch-size", type=int, default=16, help="batch size (default %(default)s)")
    demo.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone (default %(default)s)")
    demo.add_argument("--output", type=Path, default=Path("results"), help="results root (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    data = sub.add_parser(
        "data", help="download and build a real defect data set (adtr-anomalib data bsdata --root DIR)"
    )
    sets = data.add_subparsers(dest="dataset", required=True)
    bsdata = sets.add_parser(
        "bsdata",
        help="BSData ball-screw pitting in MVTec-AD layout (550 train, 138 good + 167 pitting test images)",
        description="Download the public BSData release (about 100 MB) and build the pitting subset in MVTec-AD "
        "layout; docs/data.md says what is selected and how.",
    )
    bsdata.add_argument("--root", type=Path, required=True, help="folder to create (never overwritten)")
    bsdata.add_argument("--source", type=Path, help="an unpacked BSData release (git clone) instead of downloading")
    sub.add_parser(
        "benchmark",
        add_help=False,
        help="compare ADTR, ADTR+, PaDiM and PatchCore on the same data (adtr-anomalib benchmark --help)",
    )
    return parser


def run_demo(
    data: Path | None = None,
    category: str = "brick",
    steps: int | None = None,
    epochs: int | None = None,
    recipe: str = DEMO_RECIPE,
    lr: float | None = None,
    image_size: int = 256,
    batch_size: int = 16,
    backbone: str = "tf_efficientnet_lite0",
    output: Path = Path("results"),
    seed: int = 0,
) -> dict[str, Any]:
    """Train and test ADTR for ``steps`` optimiser steps (default :data:`DEMO_STEPS`) or ``epochs``; return the test
    metrics plus ``fit_seconds``, ``steps`` and ``results_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline by design: fail fast, never hang
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from adtr_anomalib import ADTR
    from adtr_anomalib.data import (
        TEST_FOLDER_VALIDATION,
        default_dataset_root,
        make_texture_dataset,
        mvtec_layout_folder,
    )
    from adtr_anomalib.metrics import inspection_evaluator
    from adtr_anomalib.models.adtr.components.training import step_budget
    from adtr_anomalib.post_processing import inspection_post_processor

    if epochs is not None and steps is not None:
        msg = "give --steps or --epochs, not both."
        raise ValueError(msg)
    if epochs is not None and epochs < 1:
        msg = f"--epochs must be at least 1, got {epochs}."
        raise ValueError(msg)
    if epochs is None and steps is not None and steps < 1:
        msg = f"--steps must be at least 1, got {steps}."
        raise ValueError(msg)
    # Validation only fits thresholds and normalisation: once, after training.
    length = (
        {"max_epochs": epochs, "check_val_every_n_epoch": epochs}
        if epochs is not None
        else step_budget(DEMO_STEPS if steps is None else steps)
    )
    seed_everything(seed, workers=True)
    root = make_texture_dataset(default_dataset_root(), category) if data is None else Path(data)
    # Thresholds from half of the test folder's images, which then leave the test set: the built-in test images are
    # cut from another band of the photographs than the training images, and held-back training images put the
    # thresholds below every good test image. The rank-preserving post-processor keeps the test metrics those of the
    # raw scores; its thresholds from the normal validation images flag and outline almost none of the good images.
    datamodule = mvtec_layout_folder(
        root, train_batch_size=batch_size, eval_batch_size=batch_size, seed=seed, **TEST_FOLDER_VALIDATION
    )
    model = ADTR(
        backbone=backbone,
        recipe=recipe,
        **({} if lr is None else {"lr": lr}),
        pre_processor=ADTR.configure_pre_processor((image_size, image_size), backbone=backbone),
        post_processor=inspection_post_processor(),
        evaluator=inspection_evaluator(),
    )
    engine = Engine(
        **length,
        default_root_dir=output,
        logger=False,
        deterministic="warn",
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    return {
        **metrics,
        "fit_seconds": fit_seconds,
        "steps": engine.trainer.global_step,
        "results_dir": Path(engine.trainer.default_root_dir),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adtr-anomalib`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["benchmark"]:  # its options are jsonargparse's (config files), not this parser's
        from adtr_anomalib.benchmark import main as benchmark

        return benchmark(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "data":
        from adtr_anomalib.data.bsdata import prepare_bsdata
        from adtr_anomalib.data.validation import DataError

        try:
            root = prepare_bsdata(args.root, source=args.source)
        except (DataError, FileExistsError, OSError) as err:
            print(f"adtr-anomalib data bsdata: {err}", file=sys.stderr)
            return 2
        print(f"BSData pitting ready in {root}")
    if args.command == "demo":
        if args.data is not None and not args.data.is_dir():
            print(f"adtr-anomalib demo: data folder '{args.data}' does not exist.", file=sys.stderr)
            return 2
        result = run_demo(
            data=args.data,
            category=args.category,
            steps=args.steps,
            epochs=args.epochs,
            recipe=args.recipe,
            lr=args.lr,
            image_size=args.image_size,
            batch_size=args.batch_size,
            backbone=args.backbone,
            output=args.output,
            seed=args.seed,
        )
        print(
            f"\nADTR ({args.backbone}, recipe {args.recipe}, {result['steps']} steps, "
            f"trained in {result['fit_seconds']:.0f} s)"
        )
        for key in ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO"):
            print(f"  {key:<12} {result[key]:.3f}")
        print(f"Heat maps: {result['results_dir'] / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
