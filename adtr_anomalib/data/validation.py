"""Up-front checks of a dataset's image and mask files: bad data stop a run with an error that names the file.

anomalib reads images lazily, inside the data loader. A corrupt file then fails in the middle of an epoch with
a Pillow traceback that does not say which file it was, and some bad files do not fail at all: 16-bit images
are clipped to white by ``Image.convert("RGB")``, a mask of another size is silently resized with its image,
and a grey-level mask counts every non-zero pixel as a defect. anomalib's ``Folder`` pairs masks with images
by sorted file name, and a missing or extra mask gives a ``MisMatchError`` (or a pandas error) that names no
file.

Two checks, both run before training by ADTR and ADTR+ (the first also by
:func:`~adtr_anomalib.data.mvtec_layout_folder`):

* :func:`check_folder_layout`: folders of a ``Folder`` datamodule hold images, and masks pair with images,
  checked before anomalib reads them (model ``prepare_data``);
* :func:`check_datamodule_files`: every image and mask of the set-up datasets is readable, 8-bit, within
  Pillow's size limit; masks are binary and have their image's size (model ``setup``). Headers only, except
  that non-PNG files are decoded (JPEG at 1/8 scale) to find truncation; files that passed are remembered
  by path, size and modification time, so a second check is a ``stat`` per file.

Handled rather than refused: grayscale, palette and RGBA images (anomalib converts them to RGB and drops
alpha), images of any size up to Pillow's decompression-bomb limit, tiny ones included (the pre-processor
resizes each image to the model's input before batching), and files without an image extension (anomalib
never lists them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib import TaskType
from anomalib.data import Folder
from anomalib.data.utils import LabelName
from anomalib.data.utils.path import validate_and_resolve_path
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "DataError",
    "HiddenFilesFilter",
    "check_datamodule_files",
    "check_dataset_files",
    "check_folder_layout",
    "check_mask_pairing",
    "list_images",
]

Size = tuple[int, int] | None  # (width, height) as Pillow reports it
Result = tuple[Size, str | None]  # a file's size and its problem, if any

# Problems listed in one error; the count of the rest follows.
MAX_LISTED = 10

# (path, size in bytes, mtime in ns, role) of files that passed -> their size: repeated checks only stat them.
_PASSED: dict[tuple, Size] = {}


class DataError(ValueError):
    """Dataset files that cannot be used; the message names each file and says what to do."""


def list_images(folder: str | Path, extensions: Sequence[str] | None = None) -> list[Path]:
    """Image files below ``folder`` as anomalib's folder datasets list them: recursive, by extension, sorted.

    Args:
        folder: Folder to search; a missing folder gives an empty list.
        extensions: Suffixes to accept, in any case; ``None`` uses torchvision's image extensions.

    Returns:
        The image paths, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    suffixes = {suffix.lower() for suffix in (extensions or IMG_EXTENSIONS)}
    return sorted(path for path in folder.glob("**/*") if path.suffix.lower() in suffixes and not path.is_dir())


class HiddenFilesFilter(logging.Filter):
    """Drop anomalib's "hidden files found" warning when no image below the folder it names is hidden.

    anomalib counts a file as hidden when any part of its absolute path starts with a dot, so every image of a data
    set under a hidden folder such as ``~/.cache`` (the built-in textures) is reported, with a request to check. A
    warning about files that are hidden below the folder passes unchanged. Installed on anomalib's
    ``anomalib.data.utils.path`` logger when :mod:`adtr_anomalib.data` is imported.
    """

    _MESSAGE = re.compile(r"\d+ hidden files found in (?P<folder>.+)\. Please make sure this is intended\.")

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to keep ``record``: anything but a hidden-files warning, or one with an image hidden below its
        folder."""
        match = self._MESSAGE.fullmatch(record.getMessage())
        if match is None:
            return True
        folder = Path(match.group("folder"))
        return any(part.startswith(".") for image in list_images(folder) for part in image.relative_to(folder).parts)


def _raise(problems: list[str]) -> None:
    """One error listing every problem (the first ``MAX_LISTED``), so all can be fixed before the next run."""
    if not problems:
        return
    listed = "\n".join(f"  - {problem}" for problem in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    msg = f"{len(problems)} problem(s) with dataset files; fix them and run again:\n{listed}{more}"
    raise DataError(msg)


def check_mask_pairing(images: Sequence[Path], masks: Sequence[Path]) -> None:
    """Check that masks pair with anomalous images the way anomalib's ``Folder`` pairs them.

    anomalib sorts both lists and pairs them in order, requiring each image's stem to occur in its mask's stem
    (``000.png`` with ``000.png`` or ``000_mask.png``). Anything else fails there without naming a file.

    Args:
        images: The anomalous images.
        masks: The mask files to pair with them.

    Raises:
        DataError: Naming the images without a mask, the masks without an image, or the first pair that
            sorted order gets wrong (``img10.png`` sorts after ``img1.png``, ``img10_mask.png`` before
            ``img1_mask.png``).
    """
    images, masks = sorted(images), sorted(masks)
    if len(images) == len(masks) and all(i.stem in m.stem for i, m in zip(images, masks, strict=True)):
        return
    problems = [
        f"'{image}': anomalous image without a mask (expected e.g. '{image.stem}_mask.png' in the mask folder). "
        "Add its mask, or remove the image."
        for image in images
        if not any(image.stem in mask.stem for mask in masks)
    ]
    problems += [
        f"'{mask}': mask that pairs with no anomalous image (no image stem occurs in '{mask.stem}'). "
        "Remove it, or add its image."
        for mask in masks
        if not any(image.stem in mask.stem for image in images)
    ]
    if not problems and len(images) != len(masks):
        problems.append(
            f"{len(images)} anomalous images but {len(masks)} masks: some images match several masks "
            f"(e.g. '{masks[0]}'). Keep one mask per image."
        )
    if not problems:
        image, mask = next((i, m) for i, m in zip(images, masks, strict=True) if i.stem not in m.stem)
        problems.append(
            f"'{image}' would get the mask '{mask}': anomalib's Folder pairs masks with images in sorted file-name "
            "order, and these names sort differently. Give masks their image's exact stem, or zero-pad numbers "
            "(img01.png, img10.png)."
        )
    _raise(problems)


def check_folder_layout(datamodule: Any) -> None:
    """Check an anomalib ``Folder`` datamodule's folders before anomalib reads them (others are left alone).

    Also looks inside wrappers with a ``datamodule`` attribute (:class:`~adtr_anomalib.data.WithAnomalies`) and
    at the training anomalies of :class:`~adtr_anomalib.data.FolderWithAnomalies`.

    Args:
        datamodule: Any datamodule; only a ``Folder``, wrapped or not, is checked.

    Raises:
        DataError: The training folder holds no images, or masks do not pair with anomalous images.
    """
    datamodule = getattr(datamodule, "datamodule", datamodule)
    if not isinstance(datamodule, Folder):
        return

    def folders(value: str | Path | Sequence[str | Path] | None) -> list[Path]:
        values = [value] if isinstance(value, str | Path) else list(value or [])
        return [validate_and_resolve_path(folder, datamodule.root) for folder in values]

    def images(value: str | Path | Sequence[str | Path] | None) -> list[Path]:
        return [path for folder in folders(value) for path in list_images(folder, datamodule.extensions)]

    extensions = sorted(datamodule.extensions or IMG_EXTENSIONS)
    for folder in folders(datamodule.normal_dir):
        if not list_images(folder, extensions):
            others = sorted(p.name for p in folder.iterdir() if p.is_file())[:3]
            msg = (
                f"The training folder '{folder}' (normal_dir) holds no images"
                + (f", only other files such as {others}" if others else "")
                + f". Put the normal training images there (extensions {extensions})."
            )
            raise DataError(msg)
    pairs = [(datamodule.abnormal_dir, datamodule.mask_dir)]
    pairs.append((getattr(datamodule, "train_abnormal_dir", None), getattr(datamodule, "train_mask_dir", None)))
    for abnormal_dir, mask_dir in pairs:
        if abnormal_dir is not None and mask_dir is not None:
            check_mask_pairing(images(abnormal_dir), images(mask_dir))


def _inspect(path: Path, what: str) -> Result:
    """``(size, None)`` for a usable image file, ``(size or None, problem)`` otherwise."""
    try:
        with Image.open(path) as image:
            size, mode, image_format = image.size, image.mode, image.format
            image.verify()  # PNG: every chunk's checksum, up to the end of the file
        if image_format != "PNG":  # other formats are only found truncated by decoding them
            with Image.open(path) as image:
                image.draft(mode, (max(size[0] // 8, 1), max(size[1] // 8, 1)))  # JPEG: decode at 1/8 scale
                image.load()
    except FileNotFoundError:
        return None, f"'{path}': {what} file does not exist (moved or deleted?). Restore it or list the folder again."
    except Image.DecompressionBombError as error:
        return None, (
            f"'{path}': {what} too large to read safely ({error}). Downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust the file."
        )
    except UnidentifiedImageError:
        return None, (
            f"'{path}': not an image Pillow can read (empty, corrupt, or another file type with an image "
            "extension). Replace it, or remove it from the folder."
        )
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for damaged files; all mean the same here
        return None, f"'{path}': {what} file is truncated or corrupt ({error}). Copy it again, or remove it."
    if what == "image" and (mode.startswith("I") or mode == "F"):  # binary 16-bit masks read correctly
        return size, (
            f"'{path}': {what} has more than 8 bits per channel (Pillow mode {mode}); anomalib reads images as 8-bit "
            "and would clip it to white. Convert it to 8-bit first (scale 16-bit values by 255/65535)."
        )
    return size, None


def _inspect_mask(path: Path, image: Path, image_size: Size) -> Result:
    size, problem = _inspect(path, "mask")
    if problem is not None:
        return size, problem
    if image_size is not None and size != image_size:
        return size, (
            f"'{path}': mask is {size[0]}x{size[1]} but its image '{image}' is {image_size[0]}x{image_size[1]}. "
            "A mask must have its image's size: check that it belongs to this image, or resize it (nearest neighbour)."
        )
    with Image.open(path) as mask:
        levels = sorted(value for _, value in mask.convert("L").getcolors(256))  # as anomalib reads masks
    if len(levels) > 2:
        return size, (
            f"'{path}': mask is not binary ({len(levels)} grey levels, e.g. {levels[:4]}); anomalib marks every pixel "
            "above 0 as a defect, so soft edges and compression noise become defects. Save it as PNG with 0 for good "
            "and 255 for defective pixels (e.g. threshold it at 128)."
        )
    return size, None


def _check(path: Path, role: tuple, inspect: Callable[..., Result], *args: object) -> Result:
    """``inspect(path, *args)``, unless this file (same path, size, modification time and role) passed before."""
    try:
        stat = path.stat()
        key: tuple | None = (str(path), stat.st_size, stat.st_mtime_ns, *role)
    except OSError:
        key = None
    if key in _PASSED:
        return _PASSED[key], None
    size, problem = inspect(path, *args)
    if problem is None and key is not None:
        _PASSED[key] = size
    return size, problem


def check_dataset_files(datasets: Iterable[Any]) -> None:
    """Check every image of anomalib datasets (their ``samples``), and the masks of segmentation datasets.

    Args:
        datasets: Datasets to check; any without a ``samples`` table of image paths is skipped.

    Raises:
        DataError: Listing every unusable file (up to ``MAX_LISTED``) with what to do about it.
    """
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for dataset in datasets:
        samples: pd.DataFrame | None = getattr(dataset, "samples", None)
        if samples is None or "image_path" not in samples:
            continue
        segmentation = samples.attrs.get("task") == TaskType.SEGMENTATION
        masks = samples["mask_path"] if "mask_path" in samples else [""] * len(samples)
        labels = samples["label_index"] if "label_index" in samples else [pd.NA] * len(samples)
        for image_path, mask_path, label in zip(samples["image_path"], masks, labels, strict=True):
            image_path, mask_path = str(image_path), str(mask_path or "")
            if (image_path, mask_path) in seen:
                continue
            seen.add((image_path, mask_path))
            image = Path(image_path)
            size, problem = _check(image, ("image",), _inspect, "image")
            problems += [problem] if problem else []
            if not segmentation or pd.isna(label) or int(label) != LabelName.ABNORMAL:
                continue
            if mask_path in {"", "nan"}:
                problems.append(
                    f"'{image}': anomalous image without a mask in a dataset with masks. Add its mask, or drop the "
                    "masks (mask_dir) to use image labels only."
                )
                continue
            mask = Path(mask_path)
            _, problem = _check(mask, ("mask", size), _inspect_mask, image, size)
            problems += [problem] if problem else []
    _raise(problems)


def check_datamodule_files(datamodule: Any) -> None:
    """:func:`check_dataset_files` on the train, validation and test data of a set-up datamodule.

    Args:
        datamodule: A datamodule after ``setup()``; splits it lacks are skipped.
    """
    datasets = [getattr(datamodule, name, None) for name in ("train_data", "val_data", "test_data")]
    check_dataset_files(dataset for dataset in datasets if dataset is not None)
