"""anomalib ``Folder`` datamodules for image folders laid out like MVTec-AD.

Users keep their line images as ``train/good``, ``test/good``, ``test/<defect>`` and optionally
``ground_truth/<defect>/<stem>_mask.png``. anomalib's ``Folder`` reads that, but needs every directory spelled
out; this finds them so one path is enough.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalib.data import Folder
from anomalib.data.utils import ValSplitMode

from adtr_anomalib.data.validation import check_folder_layout, list_images

# Validation on held-back training images (10%) with anomalib's synthetic (Perlin) anomalies: the post-processor's
# normalisation and threshold then come from images that are not the test images. Use it with
# adtr_anomalib.post_processing.RankPreservingPostProcessor: anomalib's default post-processor clamps normalised
# scores to [0, 1], and real defects weaker than the synthetic ones would tie with normal images at 0 in the test
# metrics. The demo and the benchmark do both. Pass it to mvtec_layout_folder(**HELD_OUT_VALIDATION).
HELD_OUT_VALIDATION: dict[str, Any] = {"val_split_mode": ValSplitMode.SYNTHETIC, "val_split_ratio": 0.1}
# Validation from half of the test folder's images, moved out of the test set (anomalib's ``Folder`` default): the
# thresholds then come from good images taken as the test images were, which matters where the training images were
# taken otherwise (the built-in textures' test images are cut from another band of the photographs).
TEST_FOLDER_VALIDATION: dict[str, Any] = {"val_split_mode": ValSplitMode.FROM_TEST, "val_split_ratio": 0.5}


def _has_images(folder: Path) -> bool:
    return bool(list_images(folder))


def mvtec_layout_folder(root: str | Path, name: str | None = None, **kwargs: Any) -> Folder:
    """Build a ``Folder`` datamodule for ``root`` in MVTec-AD layout.

    Validation uses the test images by default (``val_split_mode="same_as_test"``, as anomalib's MVTecAD does):
    the post-processor's min-max normalisation then covers every test score. ``**HELD_OUT_VALIDATION`` validates
    on held-back training images with synthetic anomalies instead, so thresholds never see the test images.
    Pass any other ``Folder`` argument through ``kwargs``.

    Args:
        root: Dataset folder with ``train``, ``test`` and optionally ``ground_truth``.
        name: Name of the datamodule; ``None`` uses the folder's name.
        **kwargs: Further ``Folder`` arguments; they override the defaults here (``val_split_mode``, ``num_workers=0``).

    Returns:
        The ``Folder`` datamodule, its folders already checked (not set up).

    Raises:
        FileNotFoundError: ``root`` or ``root/train/good`` is missing or holds no images.
        DataError: Masks do not pair with the defect images (see :func:`check_folder_layout`).
    """
    root = Path(root).expanduser().resolve()
    train = root / "train" / "good"
    if not _has_images(train):
        msg = (
            f"No training images in '{train}'. Expected the MVTec-AD layout: train/good/*.png|jpg, "
            "test/good/, test/<defect>/ and optionally ground_truth/<defect>/<stem>_mask.png."
        )
        raise FileNotFoundError(msg)
    test = root / "test"
    defects = sorted(p.name for p in test.iterdir() if p.name != "good" and _has_images(p)) if test.is_dir() else []
    masks = [root / "ground_truth" / defect for defect in defects]
    with_masks = bool(defects) and all(m.is_dir() for m in masks)
    if defects and not with_masks and any(m.is_dir() for m in masks):
        missing = [str(m) for m in masks if not m.is_dir()]
        msg = f"Some defect types have masks and some not; missing mask folders: {missing}."
        raise FileNotFoundError(msg)
    options: dict[str, Any] = {"val_split_mode": ValSplitMode.SAME_AS_TEST, "num_workers": 0}
    options.update(kwargs)
    datamodule = Folder(
        name=name or root.name,
        root=root,
        normal_dir=train,
        normal_test_dir=(test / "good") if _has_images(test / "good") else None,
        abnormal_dir=[test / d for d in defects] or None,
        mask_dir=masks if with_masks else None,
        **options,
    )
    check_folder_layout(datamodule)
    return datamodule
