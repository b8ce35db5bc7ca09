"""Labelled anomalies in the training set, which anomalib's datamodules never allow.

anomalib's ``make_folder_dataset`` (and every other dataset maker) sends all anomalous images to the test
split. ADTR+ needs some in training. The dataset's ``samples`` setter does not check labels, and training
items carry ``gt_label``/``gt_mask`` like test items, so anomalies can be added to the training samples:

* :class:`FolderWithAnomalies`: anomalib's ``Folder`` plus ``train_abnormal_dir`` (and ``train_mask_dir``),
  anomalous images given for training, with or without masks.
* :func:`move_test_anomalies_to_train`: move ``N`` anomalous images per defect type out of the test split
  of a set-up datamodule (MVTecAD, Visa, Folder, ...) into training, seeded.
* :class:`WithAnomalies`: a datamodule wrapping any other one, for the CLI and configs; it moves test
  anomalies and/or adds on-the-fly synthetic anomalies (:mod:`adtr_anomalib.data.synthetic`).

Training anomalies with masks make the training set a segmentation set (normal images get empty masks);
anomalies without masks make it a classification set (no masks at all), which ADTR+ trains with ``L_img``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule, Folder
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.folder import make_folder_dataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from lightning.pytorch.trainer.states import TrainerFn
from torchvision.transforms.v2 import Transform

from adtr_anomalib.data.synthetic import AnomalyInjectionDataset

logger = logging.getLogger(__name__)

__all__ = ["FolderWithAnomalies", "WithAnomalies", "add_training_anomalies", "move_test_anomalies_to_train"]


def _resolved(paths: pd.Series) -> set[str]:
    return {str(Path(p).resolve()) for p in paths}


def add_training_anomalies(dataset: AnomalibDataset, anomalies: pd.DataFrame) -> AnomalibDataset:
    """Return a copy of ``dataset`` whose samples also hold the anomalous rows ``anomalies`` (label 1).

    The task becomes segmentation when every anomalous training image has a mask, classification otherwise
    (a batch cannot mix images with and without masks).

    Args:
        dataset: The training dataset; left unchanged.
        anomalies: Anomalous sample rows in the layout of ``dataset.samples``.

    Returns:
        The extended copy, or ``dataset`` itself when ``anomalies`` is empty.

    Raises:
        ValueError: If a row of ``anomalies`` is not labelled anomalous.
    """
    if anomalies.empty:
        return dataset
    if not (anomalies["label_index"] == LabelName.ABNORMAL).all():
        msg = "add_training_anomalies expects anomalous samples only (label_index 1)."
        raise ValueError(msg)
    rows = anomalies.copy()
    rows["split"] = Split.TRAIN.value
    samples = pd.concat([dataset.samples, rows], ignore_index=True)
    anomalous = samples[samples["label_index"] == LabelName.ABNORMAL]
    has_masks = bool((anomalous["mask_path"].fillna("").astype(str) != "").all())
    if not has_masks:
        samples["mask_path"] = ""
    result = copy.deepcopy(dataset)
    result.samples = samples
    result.samples.attrs["task"] = "segmentation" if has_masks else "classification"
    return result


def move_test_anomalies_to_train(
    datamodule: AnomalibDataModule,
    per_defect_type: int,
    seed: int = 0,
    train_on_moved: bool = True,
) -> pd.DataFrame:
    """Move ``per_defect_type`` anomalous test images of every defect type into training, in place.

    Works on any set-up image datamodule (MVTecAD, Visa, Folder, ...). The defect type of an image is the
    name of its folder (``test/<defect>/x.png`` for MVTec-AD and VisA, the abnormal directory for Folder).
    Images are drawn with ``numpy.random.default_rng(seed)`` from the path-sorted list of each type, so the
    same seed and data give the same choice. Moved images leave the test split and the validation split.

    Args:
        datamodule: A datamodule after ``setup()``.
        per_defect_type: Images to move per defect type; must not exceed the images of any type.
        seed: Seed of the draw.
        train_on_moved: ``False`` removes the images from test/validation without adding them to training,
            so a model trained on normal images only is tested on exactly the same images.

    Returns:
        The moved samples (``image_path``, ``mask_path``, ``defect_type``, ...).
    """
    if isinstance(per_defect_type, bool) or not isinstance(per_defect_type, int) or per_defect_type < 1:
        msg = f"per_defect_type (move_from_test) must be a positive integer, got {per_defect_type!r}."
        raise ValueError(msg)
    if getattr(datamodule, "test_data", None) is None or not hasattr(datamodule, "train_data"):
        msg = f"{type(datamodule).__name__} has no train/test data yet: call datamodule.setup() first."
        raise RuntimeError(msg)
    if getattr(datamodule, "moved_anomalies", None) is not None:
        msg = "Test anomalies were already moved to training for this datamodule; set it up again first."
        raise RuntimeError(msg)

    test = datamodule.test_data.samples
    abnormal = test[test["label_index"] == LabelName.ABNORMAL]
    defect_types = abnormal["image_path"].map(lambda p: Path(p).parent.name)
    if abnormal.empty:
        msg = "The test split has no anomalous images to move (move_from_test)."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for defect in sorted(defect_types.unique()):
        candidates = abnormal.index[defect_types == defect]
        candidates = sorted(candidates, key=lambda i: test.at[i, "image_path"])
        if per_defect_type > len(candidates):
            msg = (
                f"move_from_test={per_defect_type} but the test split has only {len(candidates)} "
                f"images of defect type {defect!r}."
            )
            raise ValueError(msg)
        if per_defect_type == len(candidates):
            logger.warning("Moving all %d test images of defect type %r: none left to test.", len(candidates), defect)
        picks = rng.choice(len(candidates), size=per_defect_type, replace=False)
        chosen.extend(candidates[i] for i in sorted(picks))

    moved = test.loc[chosen].copy()
    moved["defect_type"] = defect_types.loc[chosen]
    moved_paths = _resolved(moved["image_path"])
    datamodule.test_data = _without(datamodule.test_data, moved_paths)
    if getattr(datamodule, "val_data", None) is not None:
        datamodule.val_data = _without(datamodule.val_data, moved_paths)
    if train_on_moved:
        datamodule.train_data = add_training_anomalies(datamodule.train_data, moved.drop(columns="defect_type"))
    datamodule.moved_anomalies = moved.reset_index(drop=True)
    logger.info(
        "Moved %d anomalous test images (%d per defect type, seed %d) %s.",
        len(moved),
        per_defect_type,
        seed,
        "into training" if train_on_moved else "out of test (held out)",
    )
    return datamodule.moved_anomalies


def _without(dataset: AnomalibDataset, paths: set[str]) -> AnomalibDataset:
    """Copy of ``dataset`` without the samples whose resolved image path is in ``paths``."""
    keep = [i for i, p in enumerate(dataset.samples["image_path"]) if str(Path(p).resolve()) not in paths]
    return dataset.subsample(keep)


class FolderWithAnomalies(Folder):
    """anomalib's ``Folder`` datamodule plus anomalous images for training, with or without masks.

    Everything else behaves like ``Folder``. Training anomalies are added after the test and validation
    splits are made, so none of them can be drawn into test or validation; an image that is also in the
    test split is an error.

    Args:
        train_abnormal_dir: Folder(s) of anomalous training images (label 1).
        train_mask_dir: Folder(s) of their masks, paired by sorted file name as in ``Folder`` (``abc.png``
            with ``abc.png`` or ``abc_mask.png``). Without it the training set has image labels only.
        Other arguments: as :class:`anomalib.data.Folder`.

    Example:
        >>> datamodule = FolderWithAnomalies(  # doctest: +SKIP
        ...     name="pitting", root="datasets/bsdata", normal_dir="train/good", normal_test_dir="test/good",
        ...     abnormal_dir="test/pitting", mask_dir="ground_truth/pitting",
        ...     train_abnormal_dir="train/pitting", train_mask_dir="ground_truth_train/pitting",
        ... )
    """

    def __init__(
        self,
        name: str,
        normal_dir: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        normal_test_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        train_abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        train_mask_dir: str | Path | Sequence[str | Path] | None = None,
        normal_split_ratio: float = 0.2,
        extensions: tuple[str] | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if train_mask_dir is not None and train_abnormal_dir is None:
            msg = "train_mask_dir is set but train_abnormal_dir is not: give the anomalous training images too."
            raise ValueError(msg)
        super().__init__(
            name=name,
            normal_dir=normal_dir,
            root=root,
            abnormal_dir=abnormal_dir,
            normal_test_dir=normal_test_dir,
            mask_dir=mask_dir,
            normal_split_ratio=normal_split_ratio,
            extensions=extensions,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.train_abnormal_dir = train_abnormal_dir
        self.train_mask_dir = train_mask_dir

    def training_anomalies(self) -> pd.DataFrame:
        """Samples of the anomalous training images (read with anomalib's own folder parser).

        Returns:
            One row per anomalous training image; empty when ``train_abnormal_dir`` is not set.

        Raises:
            ValueError: If ``train_abnormal_dir`` holds no images.
        """
        if self.train_abnormal_dir is None:
            return pd.DataFrame()
        # make_folder_dataset pairs images with masks and checks the names; it needs a normal_dir, whose
        # rows are dropped here.
        samples = make_folder_dataset(
            normal_dir=self.normal_dir,
            root=self.root,
            abnormal_dir=self.train_abnormal_dir,
            mask_dir=self.train_mask_dir,
            extensions=self.extensions,
        )
        anomalies = samples[samples["label_index"] == LabelName.ABNORMAL].reset_index(drop=True)
        if anomalies.empty:
            msg = f"train_abnormal_dir {self.train_abnormal_dir!s} holds no images."
            raise ValueError(msg)
        return anomalies

    def _create_val_split(self) -> None:
        """anomalib's validation split, then the training anomalies (after every split, so they stay out)."""
        super()._create_val_split()
        anomalies = self.training_anomalies()
        if anomalies.empty:
            return
        held_out = _resolved(self.test_data.samples["image_path"])
        if getattr(self, "val_data", None) is not None:
            held_out |= _resolved(self.val_data.samples["image_path"])
        leaked = sorted(_resolved(anomalies["image_path"]) & held_out)
        if leaked:
            msg = (
                f"{len(leaked)} images of train_abnormal_dir are also in the test/validation split "
                f"(e.g. {leaked[0]}): training and test anomalies must be different files."
            )
            raise ValueError(msg)
        self.train_data = add_training_anomalies(self.train_data, anomalies)


class WithAnomalies(AnomalibDataModule):
    """Any anomalib datamodule, with anomalies in its training set: moved from test and/or synthetic.

    Made for the CLI and configs, where a function cannot be applied after ``setup``::

        data:
          class_path: adtr_anomalib.data.WithAnomalies
          init_args:
            datamodule:
              class_path: anomalib.data.MVTecAD
              init_args: {category: bottle}
            move_from_test: 5
            synthetic_anomalies:
              class_path: adtr_anomalib.data.ConfettiNoise

    Args:
        datamodule: The datamodule to wrap (batch sizes, splits and augmentations are its own).
        move_from_test: Anomalous test images per defect type to move into training
            (:func:`move_test_anomalies_to_train`); 0 moves none.
        train_on_moved: ``False`` only removes the moved images from test and validation, so models trained
            without anomalies see the same test images as the ones trained with them.
        synthetic_anomalies: Generator(s) of on-the-fly anomalies applied to normal training images
            (:class:`~adtr_anomalib.data.ConfettiNoise`, anomalib's ``PerlinAnomalyGenerator``).
        seed: Seed of the images moved from test.
    """

    def __init__(
        self,
        datamodule: AnomalibDataModule,
        move_from_test: int = 0,
        train_on_moved: bool = True,
        synthetic_anomalies: Transform | Sequence[Transform] | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(datamodule, AnomalibDataModule):
            msg = f"datamodule must be an anomalib datamodule, got {type(datamodule).__name__}."
            raise TypeError(msg)
        if isinstance(move_from_test, bool) or not isinstance(move_from_test, int) or move_from_test < 0:
            msg = f"move_from_test must be a non-negative integer, got {move_from_test!r}."
            raise ValueError(msg)
        super().__init__(
            train_batch_size=datamodule.train_batch_size,
            eval_batch_size=datamodule.eval_batch_size,
            num_workers=datamodule.num_workers,
            train_augmentations=datamodule.train_augmentations,
            val_augmentations=datamodule.val_augmentations,
            test_augmentations=datamodule.test_augmentations,
            val_split_mode=datamodule.val_split_mode,
            val_split_ratio=datamodule.val_split_ratio,
            test_split_mode=datamodule.test_split_mode,
            test_split_ratio=datamodule.test_split_ratio,
            seed=datamodule.seed,
        )
        if synthetic_anomalies is None:
            generators: list[Transform] = []
        elif isinstance(synthetic_anomalies, Sequence):
            generators = list(synthetic_anomalies)
        else:
            generators = [synthetic_anomalies]
        if not all(callable(g) for g in generators):
            msg = "synthetic_anomalies must be callables image -> (image, mask), e.g. ConfettiNoise()."
            raise TypeError(msg)
        if move_from_test and datamodule.seed is None and datamodule.val_split_mode == ValSplitMode.FROM_TEST:
            logger.warning(
                "The wrapped datamodule has seed=None and draws validation images from test at random: the "
                "remaining test set differs between runs. Set its seed for comparable results."
            )
        self.datamodule = datamodule
        self.move_from_test = move_from_test
        self.train_on_moved = train_on_moved
        self.generators = generators
        self.move_seed = seed
        self.moved_anomalies: pd.DataFrame | None = None

    @property
    def name(self) -> str:
        """Name of the wrapped datamodule (used for result folders).

        Returns:
            The wrapped datamodule's ``name``.
        """
        return self.datamodule.name

    @property
    def category(self) -> str:
        """Category of the wrapped datamodule.

        Returns:
            The wrapped datamodule's ``category``.
        """
        return self.datamodule.category

    @category.setter
    def category(self, category: str) -> None:
        self.datamodule.category = category

    def prepare_data(self) -> None:
        """Download or prepare the wrapped data."""
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped datamodule from scratch, then add the training anomalies (once per fit)."""
        if not self._is_setup or not hasattr(self, "train_data"):
            self._setup(stage)
            if isinstance(stage, TrainerFn):
                self._is_setup = True
        self._update_augmentations()

    def _setup(self, _stage: str | None = None) -> None:
        inner = self.datamodule
        inner._is_setup = False  # rebuild from disk: a second move must never apply to moved data
        inner.moved_anomalies = None
        inner.setup(_stage)
        if self.move_from_test:
            self.moved_anomalies = move_test_anomalies_to_train(
                inner, self.move_from_test, seed=self.move_seed, train_on_moved=self.train_on_moved
            )
        self.train_data = inner.train_data
        if self.generators:
            self.train_data = AnomalyInjectionDataset(inner.train_data, self.generators)
        self.test_data = inner.test_data
        if getattr(inner, "val_data", None) is not None:
            self.val_data = inner.val_data
