"""BSData ball-screw pitting as an anomalib datamodule, built from the public release.

BSData (T. Schlagenhauf and M. Landwehr, *Data in Brief* 39 (2021) 107643; CC BY-SA 4.0) ships every image in
``data/``, labelme polygons in ``label/`` and each image's ball-screw type in ``image_data.json``. Anomaly detection
needs the MVTec-AD layout with normal training images only, so :func:`build_bsdata` selects and converts a subset:

- ball-screw type 2 only, and only its 1130x460 camera setting: the 1540x645 images are mostly pitting, so mixing
  the two would leak the label through the image size (type 1 has 69 images in 55 sizes);
- ``good`` = type-2 images without an annotation file, ``pitting`` = those with one;
- every image halved to 565x230 (Lanczos, JPEG quality 92); masks filled at full size from the ``Pitting``
  polygons, then 2x2 block means kept where at least half the block is pitting (0/255 PNG ``<stem>_mask.png``);
- good images split 80/20 into ``train/good`` and ``test/good`` with ``random.Random(0)``.

The result holds 550 training, 138 good and 167 pitting test images. :class:`BSData` downloads the release and
builds that folder in ``prepare_data``, as anomalib's ``MVTecAD`` does for its archive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from urllib.request import urlretrieve

import numpy as np
from anomalib.data import Folder
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.data.utils.download import DownloadProgressBar, extract
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import Transform

from adtr_anomalib.data.validation import DataError

logger = logging.getLogger(__name__)

NAME = "bsdata_pitting"
SOURCE_COMMIT = "7204b28"
SOURCE_URL = f"https://github.com/2Obe/BSData/archive/{SOURCE_COMMIT}.zip"
CAMERA_SIZE = (1130, 460)  # width, height of the type-2 camera setting that is kept
BSD_TYPE = 2
JPEG_QUALITY = 92
TEST_SHARE = 0.2
# What the built folder must hold: the SHA-256 of its sorted relative file paths (one per line). GitHub makes commit
# archives on the fly and does not promise the same bytes twice, so the check is on what was built from it: a changed
# or truncated release gives other files and is refused, whatever the archive's bytes were.
FILE_LIST_SHA256 = "d60ac37e33aeb8caeb04751d96629c2dbad97a83f5a5f61501381426f4ad90a4"
LAYOUT = {
    "normal_dir": "train/good",
    "normal_test_dir": "test/good",
    "abnormal_dir": "test/pitting",
    "mask_dir": "ground_truth/pitting",
}


def file_list_sha256(root: str | Path) -> str:
    """SHA-256 of the sorted relative paths of every file under ``root``: which files, not their bytes."""
    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def _pitting_mask(annotation: Path, size: tuple[int, int]) -> Image.Image:
    """Fill the annotation's pitting polygons at full size, then halve by 2x2 block majority (0/255, mode L)."""
    try:
        shapes = json.loads(annotation.read_text())["shapes"]
    except (OSError, ValueError, KeyError) as err:
        msg = f"'{annotation}' is not a labelme annotation with 'shapes' ({err}); re-download the BSData release."
        raise DataError(msg) from err
    full = Image.new("L", size, 0)
    draw = ImageDraw.Draw(full)
    for shape in shapes:
        if str(shape.get("label", "")).lower() == "pitting" and len(shape.get("points", ())) >= 3:
            draw.polygon([tuple(point) for point in shape["points"]], fill=1)
    width, height = size
    blocks = np.asarray(full, dtype=np.float32).reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    return Image.fromarray(np.where(blocks >= 0.5, 255, 0).astype(np.uint8), mode="L")


def _halve(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)


def build_bsdata(source: str | Path, root: str | Path, *, expected_files: str | None = FILE_LIST_SHA256) -> Path:
    """Convert an unpacked BSData release (``data/``, ``label/``, ``image_data.json``) into ``root``.

    Args:
        source: The release's top folder, e.g. a ``git clone`` of ``2Obe/BSData``.
        root: Where the MVTec-layout folder goes; must not exist yet.
        expected_files: :func:`file_list_sha256` the result must have; ``None`` skips the check (other releases).

    Returns:
        ``root``, complete.

    Raises:
        DataError: The source is not a BSData release, or the result is not the documented subset.
        FileExistsError: ``root`` already exists: it is never overwritten.
    """
    source, root = Path(source), Path(root)
    index = source / "image_data.json"
    if not index.is_file() or not (source / "data").is_dir():
        msg = f"'{source}' is not a BSData release: expected 'data/' and 'image_data.json' (github.com/2Obe/BSData)."
        raise DataError(msg)
    if root.exists():
        msg = f"'{root}' already exists; remove it or choose another root: the BSData build never overwrites a folder."
        raise FileExistsError(msg)
    try:
        entries = json.loads(index.read_text())["images"]
    except (ValueError, KeyError) as err:
        msg = f"'{index}' has no 'images' list ({err}); re-download the BSData release."
        raise DataError(msg) from err
    good: list[Path] = []
    pitting: list[tuple[Path, Path]] = []
    for entry in entries:
        image = source / "data" / entry["filename"]
        if entry.get("type") != BSD_TYPE or not image.is_file():
            continue
        with Image.open(image) as opened:
            if opened.size != CAMERA_SIZE:
                continue
        annotation = source / "label" / f"{image.stem}.json"
        if annotation.is_file():
            pitting.append((image, annotation))
        else:
            good.append(image)
    if not good or not pitting:
        msg = f"'{source}' holds {len(good)} good and {len(pitting)} pitting type-2 images of {CAMERA_SIZE}; need both."
        raise DataError(msg)
    names = sorted(p.name for p in good)
    test_names = set(random.Random(0).sample(names, len(names) - int((1 - TEST_SHARE) * len(names))))
    # Build beside the target and rename at the end: an interrupted build never leaves a folder that looks complete.
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent if root.parent.is_dir() else None))
    try:
        for folder in ("train/good", "test/good", "test/pitting", "ground_truth/pitting"):
            (partial / folder).mkdir(parents=True)
        for image in good:
            split = "test" if image.name in test_names else "train"
            with Image.open(image) as opened:
                _halve(opened).save(partial / split / "good" / image.name, quality=JPEG_QUALITY)
        for image, annotation in pitting:
            with Image.open(image) as opened:
                _halve(opened).save(partial / "test" / "pitting" / image.name, quality=JPEG_QUALITY)
                _pitting_mask(annotation, opened.size).save(
                    partial / "ground_truth" / "pitting" / f"{image.stem}_mask.png"
                )
        found = file_list_sha256(partial)
        if expected_files is not None and found != expected_files:
            msg = (
                f"the BSData build from '{source}' is not the documented subset (file list {found[:12]}, expected "
                f"{expected_files[:12]}): the release changed. Use commit {SOURCE_COMMIT} of github.com/2Obe/BSData."
            )
            raise DataError(msg)
        root.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("BSData pitting built in %s: %d good, %d pitting images.", root, len(good), len(pitting))
    return root


def is_complete(root: str | Path) -> bool:
    """Whether ``root`` holds exactly the files of a BSData build."""
    return Path(root).is_dir() and file_list_sha256(root) == FILE_LIST_SHA256


def prepare_bsdata(root: str | Path, source: str | Path | None = None) -> Path:
    """Make ``root`` the BSData pitting folder: nothing to do where it is complete, otherwise built from ``source``
    (an unpacked release) or from a download of the release (about 100 MB, progress bar).

    Raises:
        FileExistsError: ``root`` exists but is not a complete build: it is left as it is.
    """
    root = Path(root).expanduser()
    if is_complete(root):
        logger.info("Found the BSData pitting set in %s.", root)
        return root
    if root.exists():
        msg = (
            f"'{root}' exists but is not a complete BSData pitting build (other or missing files); remove it or "
            "choose another root: it is never overwritten."
        )
        raise FileExistsError(msg)
    if source is not None:
        return build_bsdata(source, root, expected_files=FILE_LIST_SHA256)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bsdata-download.", dir=root.parent) as scratch:
        archive = Path(scratch) / f"BSData-{SOURCE_COMMIT}.zip"
        logger.info("Downloading BSData (%s).", SOURCE_URL)
        # anomalib's download_and_extract insists on the archive's checksum, which GitHub does not keep stable for
        # generated archives; its progress bar and safe extraction are used, and build_bsdata checks the result.
        try:
            with DownloadProgressBar(unit="B", unit_scale=True, miniters=1, desc="BSData") as progress:
                urlretrieve(SOURCE_URL, filename=archive, reporthook=progress.update_to)
        except OSError as err:
            msg = (
                f"could not download {SOURCE_URL} ({err}). Without network, clone github.com/2Obe/BSData on a machine "
                "that has it and pass the clone as source (adtr-anomalib data bsdata --source DIR)."
            )
            raise DataError(msg) from err
        extract(archive, Path(scratch))
        releases = [p.parent for p in Path(scratch).glob("*/image_data.json")]
        if len(releases) != 1:
            msg = f"the download from {SOURCE_URL} holds no BSData release; retry, or pass an unpacked clone as source."
            raise DataError(msg)
        return build_bsdata(releases[0], root, expected_files=FILE_LIST_SHA256)


class BSData(Folder):
    """BSData ball-screw pitting (a surface with small defects and pixel masks), downloaded and built on first use.

    A ``Folder`` datamodule with the layout filled in; the other arguments are ``Folder``'s, listed out so that
    anomalib's CLI and configs see them (``--data adtr_anomalib.data.BSData --data.val_split_mode synthetic``).

    Example:
        >>> datamodule = BSData(root="./datasets/bsdata_pitting", val_split_mode="synthetic", val_split_ratio=0.1)
        >>> datamodule.prepare_data()  # downloads and builds once; later calls find the folder
    """

    def __init__(
        self,
        root: str | Path = f"./datasets/{NAME}",
        source: str | Path | None = None,
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
        """``source``: an unpacked BSData release to build from instead of downloading it."""
        super().__init__(
            name=NAME,
            root=Path(root).expanduser(),
            **LAYOUT,
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
        self.source = source

    def prepare_data(self) -> None:
        """Download and build the folder where it is not complete (once, on the main process)."""
        prepare_bsdata(self.root, self.source)
