"""Robustness to bad images and masks: every case is processed correctly, or refused
before training with an error that names the file and says what to do."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.data.utils import read_image, read_mask
from PIL import Image

from adtr_anomalib.data import DataError, check_datamodule_files, mvtec_layout_folder
from tests.helpers import make_folder, save_image, tiny_adtr, tiny_engine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "part")


def _check(root: Path) -> None:
    """Set up the datamodule users get from a folder, then run the file check the models run in ``setup``."""
    datamodule = mvtec_layout_folder(root)
    datamodule.setup()
    check_datamodule_files(datamodule)


def _refused(root: Path, path: Path, *reason: str) -> str:
    """The check fails, naming ``path`` and each ``reason``; returns the message."""
    with pytest.raises(DataError) as error:
        _check(root)
    message = str(error.value)
    assert f"'{path.resolve()}'" in message, message
    for text in reason:
        assert re.search(text, message), (text, message)
    return message


def _folder(root: Path, **kwargs: object) -> Folder:
    """anomalib's own Folder datamodule, as configs/adtr/folder.yaml builds it."""
    options = {
        "name": "part",
        "root": root,
        "normal_dir": "train/good",
        "normal_test_dir": "test/good",
        "abnormal_dir": "test/defect",
        "mask_dir": "ground_truth/defect",
        "train_batch_size": 4,
        "eval_batch_size": 4,
        "num_workers": 0,
        "val_split_mode": "same_as_test",
        "seed": 0,
    }
    return Folder(**{**options, **kwargs})


# --- images ---------------------------------------------------------------------------------------------------


def test_truncated_jpeg_error_names_file(root: Path) -> None:
    path = save_image(root / "train" / "good" / "cut.jpg", np.full((64, 64, 3), 90, np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refused(root, path, "truncated or corrupt", "Copy it again, or remove it")


def test_truncated_png_error_names_file(root: Path) -> None:
    path = root / "train" / "good" / "000.png"
    path.write_bytes(path.read_bytes()[:-40])
    _refused(root, path, "truncated or corrupt")


def test_corrupt_png_checksum_error_names_file(root: Path) -> None:
    path = root / "test" / "good" / "001.png"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # inside the image data: the chunk checksum no longer matches
    path.write_bytes(bytes(data))
    _refused(root, path, "truncated or corrupt")


@pytest.mark.parametrize("content", [b"", b"camera log, not an image\n"], ids=["empty file", "text file"])
def test_non_image_file_with_image_extension_error_names_file(root: Path, content: bytes) -> None:
    path = root / "train" / "good" / "zz.png"
    path.write_bytes(content)
    _refused(root, path, "not an image Pillow can read", "remove it from the folder")


def test_non_image_files_in_image_folders_are_ignored(root: Path) -> None:
    for name in ("notes.txt", "Thumbs.db", "capture.csv"):
        (root / "train" / "good" / name).write_text("not an image")
    datamodule = mvtec_layout_folder(root)
    datamodule.setup()
    check_datamodule_files(datamodule)  # anomalib lists files by image extension only
    assert {Path(p).suffix for p in datamodule.train_data.samples["image_path"]} == {".png"}
    assert len(datamodule.train_data) == 8


def test_16bit_image_error_names_file_and_says_convert(root: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = save_image(root / "train" / "good" / "deep.png", ramp)
    assert Image.open(path).mode == "I;16"
    # Why it is refused: anomalib's reader clips 16-bit values to 8 bits, so almost the whole image turns white.
    assert (read_image(path) == 1.0).mean() > 0.9
    _refused(root, path, r"more than 8 bits per channel \(Pillow mode I;16\)", "Convert it to 8-bit")


def test_empty_training_folder_is_rejected_up_front(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    for image in (root / "train" / "good").iterdir():
        image.unlink()
    (root / "train" / "good" / "readme.txt").write_text("images go here")
    with pytest.raises(FileNotFoundError, match="No training images in"):
        mvtec_layout_folder(root)
    # anomalib's Folder, through the model's prepare_data, fails before anomalib reads the folder.
    engine = tiny_engine(tmp_path / "results")
    with pytest.raises(DataError, match=r"training folder '.*train/good' \(normal_dir\) holds no images.*readme\.txt"):
        engine.fit(tiny_adtr(pre_trained=False), datamodule=_folder(root))


def test_very_large_image_over_pillow_limit_error_names_file(root: Path) -> None:
    path = root / "train" / "good" / "line_scan.png"
    Image.new("1", (13500, 13500)).save(path)  # 182 Mpixels, above Pillow's decompression-bomb limit; 22 kB
    _refused(root, path, "too large to read safely", "Downscale it")


def test_grayscale_rgba_tiny_and_large_images_train_and_score(tmp_path: Path) -> None:
    """Grayscale, RGBA, 20x12 (smaller than the backbone's stride of 32) and 3000x2000 images, mixed in one
    training folder: the pre-processor resizes each before batching, and all get finite scores."""
    root = make_folder(tmp_path / "part", n_train=4)
    train = root / "train" / "good"
    rng = np.random.default_rng(1)
    gray = save_image(train / "gray.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    rgba_pixels = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)
    rgba_pixels[..., 3] = 0  # fully transparent: anomalib keeps the colour channels and drops alpha
    rgba = save_image(train / "rgba.png", rgba_pixels)
    save_image(train / "tiny.png", rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 3000, dtype=np.float32).astype(np.uint8)
    save_image(train / "large.jpg", np.broadcast_to(ramp[None, :, None], (2000, 3000, 3)).copy())

    gray_tensor = read_image(gray, as_tensor=True)
    assert gray_tensor.shape == (3, 32, 32)
    assert torch.equal(gray_tensor[0], gray_tensor[1])
    assert torch.equal(gray_tensor[0], gray_tensor[2])
    torch.testing.assert_close(
        read_image(rgba, as_tensor=True), torch.from_numpy(rgba_pixels[..., :3]).permute(2, 0, 1) / 255
    )

    model = tiny_adtr(pre_trained=False)
    datamodule = mvtec_layout_folder(root, train_batch_size=8, eval_batch_size=8)
    engine = tiny_engine(tmp_path / "results")
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 1  # all 8 images in one batch: they were resized before collating
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape == (8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        output = model.model(model.pre_processor.transform(batch.image))
    assert torch.isfinite(output.pred_score).all()
    assert torch.isfinite(output.anomaly_map).all()


def test_corrupt_image_stops_fit_before_training_and_names_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    bad = root / "test" / "defect" / "001.png"
    bad.write_bytes(bad.read_bytes()[:50])
    engine = tiny_engine(tmp_path / "results")
    with pytest.raises(DataError, match=re.escape(str(bad.resolve()))):
        engine.fit(tiny_adtr(pre_trained=False), datamodule=_folder(root))
    assert engine.trainer.global_step == 0
    assert not list((tmp_path / "results").rglob("*.ckpt"))


# --- masks ----------------------------------------------------------------------------------------------------


def test_missing_mask_error_names_image(root: Path) -> None:
    (root / "ground_truth" / "defect" / "001_mask.png").unlink()
    image = (root / "test" / "defect" / "001.png").resolve()
    with pytest.raises(DataError, match=rf"'{re.escape(str(image))}': anomalous image without a mask"):
        mvtec_layout_folder(root)


def test_mask_without_image_error_names_mask(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    orphan = root / "ground_truth" / "defect" / "007_mask.png"
    shutil.copy(root / "ground_truth" / "defect" / "000_mask.png", orphan)
    pattern = rf"'{re.escape(str(orphan.resolve()))}': mask that pairs with no anomalous image"
    with pytest.raises(DataError, match=pattern):
        mvtec_layout_folder(root)
    # anomalib's Folder would fail with a pandas length error; the model's prepare_data names the file first.
    engine = tiny_engine(tmp_path / "results")
    with pytest.raises(DataError, match=pattern):
        engine.fit(tiny_adtr(pre_trained=False), datamodule=_folder(root))


def test_masks_that_sort_unlike_their_images_error_explains(root: Path) -> None:
    """img1/img10 with img1_mask/img10_mask: anomalib pairs by sorted name and would fail without naming a file."""
    for folder, suffix in ((root / "test" / "defect", ""), (root / "ground_truth" / "defect", "_mask")):
        for i, name in enumerate(("img1", "img10")):
            (folder / f"{i:03d}{suffix}.png").rename(folder / f"{name}{suffix}.png")
    _refused(root, root / "test" / "defect" / "img10.png", "sorted file-name order", "zero-pad numbers")


def test_mask_size_differs_from_image_error_names_both(root: Path) -> None:
    mask = root / "ground_truth" / "defect" / "000_mask.png"
    save_image(mask, np.zeros((16, 16), np.uint8))
    message = _refused(root, mask, "mask is 16x16 but its image", "must have its image's size")
    assert str((root / "test" / "defect" / "000.png").resolve()) in message


def test_non_binary_mask_error_names_file(root: Path) -> None:
    mask = root / "ground_truth" / "defect" / "001_mask.png"
    soft = np.zeros((32, 32), np.uint8)
    soft[8:16, 8:16] = 255
    soft[7, 8:16] = soft[16, 8:16] = 128  # anti-aliased edge
    save_image(mask, soft)
    _refused(root, mask, r"not binary \(3 grey levels", "threshold it at 128")


@pytest.mark.parametrize("encoding", ["0/1 values", "1-bit", "16-bit 0/65535", "RGB red on black"])
def test_binary_masks_in_other_encodings_are_accepted(root: Path, encoding: str) -> None:
    mask = root / "ground_truth" / "defect" / "000_mask.png"
    defect = np.zeros((32, 32), bool)
    defect[8:16, 8:16] = True
    if encoding == "0/1 values":
        save_image(mask, defect.astype(np.uint8))
    elif encoding == "1-bit":
        Image.fromarray(defect).save(mask)
    elif encoding == "16-bit 0/65535":
        save_image(mask, defect.astype(np.uint16) * 65535)
    else:
        save_image(mask, np.stack([defect * 255, defect * 0, defect * 0], axis=-1).astype(np.uint8))
    _check(root)
    assert torch.equal(read_mask(mask, as_tensor=True).bool(), torch.from_numpy(defect))  # anomalib reads it right


def test_mask_deleted_after_listing_error_names_mask(root: Path) -> None:
    datamodule = mvtec_layout_folder(root)
    datamodule.setup()
    mask = root / "ground_truth" / "defect" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DataError, match=rf"'{re.escape(str(mask.resolve()))}': mask file does not exist"):
        check_datamodule_files(datamodule)


def test_real_bsdata_images_and_masks_pass_the_check(bsdata_root: Path) -> None:
    """No false refusals on real line images (JPEG) with real PNG masks."""
    datamodule = mvtec_layout_folder(bsdata_root)
    datamodule.setup()
    check_datamodule_files(datamodule)
    assert len(datamodule.train_data) == 550
    assert (datamodule.test_data.samples["mask_path"] != "").sum() == 167


def test_hidden_files_warning_only_for_images_hidden_below_the_data_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib calls every image under a hidden folder (``~/.cache``) hidden; the plugin keeps only real cases."""
    from anomalib.data.utils.path import _prepare_files_labels

    from adtr_anomalib.data import HiddenFilesFilter

    path_logger = logging.getLogger("anomalib.data.utils.path")
    under_hidden = tmp_path / ".cache" / "part" / "good"
    save_image(under_hidden / "000.png", np.zeros((8, 8, 3), np.uint8))
    with_hidden = tmp_path / "plain" / "good"
    save_image(with_hidden / "000.png", np.zeros((8, 8, 3), np.uint8))
    save_image(with_hidden / ".copy" / "001.png", np.zeros((8, 8, 3), np.uint8))

    def warned(folder: Path) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=path_logger.name):
            _prepare_files_labels(folder, "normal")
        return any("hidden files found" in record.getMessage() for record in caplog.records)

    assert any(isinstance(f, HiddenFilesFilter) for f in path_logger.filters)
    assert not warned(under_hidden)
    assert warned(with_hidden)
    # Control: without the filter anomalib warns about the folder under ~/.cache too.
    filters = [f for f in path_logger.filters if isinstance(f, HiddenFilesFilter)]
    for f in filters:
        path_logger.removeFilter(f)
    try:
        assert warned(under_hidden)
    finally:
        for f in filters:
            path_logger.addFilter(f)
