"""Tests for the built-in texture anomaly dataset (adtr_anomalib.data.textures)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from adtr_anomalib.data.textures import (
    DEFECT_TYPES,
    TEXTURE_CATEGORIES,
    default_dataset_root,
    make_texture_dataset,
)
from adtr_anomalib.data.textures import dataset as texture_dataset
from adtr_anomalib.data.textures.dataset import _stems
from adtr_anomalib.data.textures.defects import paint_defect
from adtr_anomalib.data.textures.sampling import _CROP_MAX, BoolMask, bands, normal_sample, source_photo, to_uint8

# Small datasets keep the whole module fast; the counts are chosen to exercise every folder.
SMALL = {"image_size": 64, "n_train": 5, "n_test_good": 3, "n_test_defect_per_type": 2}


def _files(folder: Path) -> dict[str, bytes]:
    """Map each file's path relative to ``folder`` to its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return np.asarray(image)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small brick dataset shared by the read-only layout tests."""
    return make_texture_dataset(tmp_path_factory.mktemp("textures"), "brick", seed=3, **SMALL)


def test_constants() -> None:
    assert TEXTURE_CATEGORIES == ("brick", "grass", "gravel")
    assert DEFECT_TYPES == ("scratch", "hole", "stain", "foreign")


def test_layout_and_counts(small_dataset: Path) -> None:
    assert small_dataset.name == "brick"
    assert sorted(p.name for p in small_dataset.iterdir()) == ["ground_truth", "manifest.json", "test", "train"]
    assert sorted(p.name for p in (small_dataset / "train").iterdir()) == ["good"]
    assert sorted(p.name for p in (small_dataset / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
    assert sorted(p.name for p in (small_dataset / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)

    assert len(list((small_dataset / "train" / "good").glob("*.png"))) == SMALL["n_train"]
    assert len(list((small_dataset / "test" / "good").glob("*.png"))) == SMALL["n_test_good"]
    for defect in DEFECT_TYPES:
        assert len(list((small_dataset / "test" / defect).glob("*.png"))) == SMALL["n_test_defect_per_type"]
        assert (
            len(list((small_dataset / "ground_truth" / defect).glob("*_mask.png"))) == SMALL["n_test_defect_per_type"]
        )

    manifest = json.loads((small_dataset / "manifest.json").read_text())
    assert manifest["category"] == "brick"
    assert manifest["seed"] == 3
    assert manifest["image_size"] == SMALL["image_size"]
    n_files = sum(1 for p in small_dataset.rglob("*.png"))
    assert manifest["file_count"] == n_files == 5 + 3 + 2 * 2 * len(DEFECT_TYPES)


def test_images_are_rgb_of_requested_size(small_dataset: Path) -> None:
    for path in small_dataset.glob("t*/*/*.png"):  # train/ and test/
        with Image.open(path) as image:
            assert image.mode == "RGB", path
            assert image.size == (SMALL["image_size"], SMALL["image_size"]), path
        pixels = _load(path)
        assert pixels.std() > 5, f"{path} looks flat, not like a texture"


def test_masks_are_binary_nonempty_and_sized(small_dataset: Path) -> None:
    masks = sorted((small_dataset / "ground_truth").rglob("*.png"))
    assert len(masks) == SMALL["n_test_defect_per_type"] * len(DEFECT_TYPES)
    for mask_path in masks:
        with Image.open(mask_path) as mask_image:
            assert mask_image.mode == "L", mask_path
        mask = _load(mask_path)
        image_path = small_dataset / "test" / mask_path.parent.name / mask_path.name.replace("_mask", "")
        assert mask.shape == _load(image_path).shape[:2]
        assert set(np.unique(mask).tolist()) <= {0, 255}, mask_path
        coverage = (mask == 255).mean()
        assert 0.002 <= coverage <= 0.05, f"{mask_path}: coverage {coverage:.4f}"


def test_stems_have_equal_length_and_masks_pair_with_images(small_dataset: Path) -> None:
    for folder in [*small_dataset.glob("t*/*"), *small_dataset.glob("ground_truth/*")]:
        stems = [p.stem.removesuffix("_mask") for p in folder.glob("*.png")]
        assert stems, folder
        assert len({len(s) for s in stems}) == 1, f"{folder}: stems of different lengths {stems}"
    for defect in DEFECT_TYPES:
        images = sorted(p.stem for p in (small_dataset / "test" / defect).glob("*.png"))
        masks = sorted(p.stem for p in (small_dataset / "ground_truth" / defect).glob("*.png"))
        assert masks == [f"{stem}_mask" for stem in images]


def test_stem_width_grows_with_count() -> None:
    stems = _stems(1500)
    assert stems[0] == "0000"
    assert stems[-1] == "1499"
    assert {len(s) for s in stems} == {4}
    assert _stems(3) == ["000", "001", "002"]


def test_train_and_test_bands_do_not_overlap() -> None:
    photo = source_photo("brick")
    (train_start, train_stop), (test_start, test_stop) = bands(photo.shape[0])
    assert 0 == train_start < train_stop <= test_start < test_stop == photo.shape[0]
    assert test_stop - test_start >= _CROP_MAX
    assert train_stop - train_start >= _CROP_MAX


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("category", TEXTURE_CATEGORIES)
def test_mask_marks_exactly_the_changed_pixels(category: str, defect: str) -> None:
    for seed in range(3):
        clean, defective, mask = _defect_example(category, defect, image_size=128, seed=seed)
        assert clean.shape == defective.shape == (128, 128, 3)
        assert mask.shape == (128, 128)
        assert mask.dtype == bool
        change = np.abs(defective.astype(np.int16) - clean.astype(np.int16)).mean(axis=-1)
        inside, outside = change[mask].mean(), change[~mask].mean()
        assert inside >= 15, f"defect barely visible: mean change {inside:.1f} grey levels"
        assert inside >= 20 * outside, f"inside {inside:.2f} vs outside {outside:.2f}"
        # Away from the defect (more than 8 px from the mask) the image is bit-identical to the clean crop.
        far = ndimage.distance_transform_edt(~mask) > 8
        assert np.array_equal(defective[far], clean[far])


def test_foreign_patch_comes_from_another_texture() -> None:
    clean, defective, mask = _defect_example("gravel", "foreign", image_size=128, seed=0)
    # Replaced pixels no longer follow the crop underneath: their correlation with it is weak.
    corr = np.corrcoef(clean[mask].ravel().astype(float), defective[mask].ravel().astype(float))[0, 1]
    assert corr < 0.5


def test_deterministic_bytes(tmp_path: Path) -> None:
    first = make_texture_dataset(tmp_path / "a", "grass", seed=7, **SMALL)
    second = make_texture_dataset(tmp_path / "b", "grass", seed=7, **SMALL)
    assert _files(first) == _files(second)
    other_seed = make_texture_dataset(tmp_path / "c", "grass", seed=8, **SMALL)
    differing = [k for k, v in _files(other_seed).items() if k.endswith(".png") and v != _files(first)[k]]
    assert len(differing) > 0.9 * SMALL["n_train"]


def test_categories_differ(tmp_path: Path) -> None:
    datasets = [make_texture_dataset(tmp_path, c, seed=0, **SMALL) for c in TEXTURE_CATEGORIES]
    firsts = [_load(d / "train" / "good" / "000.png").astype(float) for d in datasets]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert np.abs(firsts[i] - firsts[j]).mean() > 10


def test_second_call_reuses_dataset_without_rewriting(tmp_path: Path) -> None:
    path = make_texture_dataset(tmp_path, "gravel", **SMALL)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    inode = path.stat().st_ino
    again = make_texture_dataset(str(tmp_path), "gravel", **SMALL)  # str root works too
    assert again == path
    assert path.stat().st_ino == inode
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gravel"], "no temporary folders left behind"


def test_other_categories_coexist_under_one_root(tmp_path: Path) -> None:
    for category in TEXTURE_CATEGORIES:
        assert make_texture_dataset(tmp_path, category, **SMALL) == tmp_path / category
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TEXTURE_CATEGORIES)


def test_different_parameters_raise_and_keep_existing_data(tmp_path: Path) -> None:
    path = make_texture_dataset(tmp_path, "brick", seed=0, **SMALL)
    before = _files(path)
    with pytest.raises(FileExistsError) as excinfo:
        make_texture_dataset(tmp_path, "brick", seed=1, **SMALL)
    message = str(excinfo.value)
    assert str(path) in message
    assert "delete" in message
    assert "another root" in message
    assert _files(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brick"], "no temporary folders left behind"


def test_foreign_files_raise_and_stay_untouched(tmp_path: Path) -> None:
    user_folder = tmp_path / "grass"
    user_folder.mkdir()
    notes = user_folder / "notes.txt"
    notes.write_text("my data")
    mtime = notes.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="grass"):
        make_texture_dataset(tmp_path, "grass", **SMALL)
    assert [p.name for p in user_folder.iterdir()] == ["notes.txt"]
    assert notes.read_text() == "my data"
    assert notes.stat().st_mtime_ns == mtime

    # An extra file inside an otherwise valid dataset also counts as foreign data.
    path = make_texture_dataset(tmp_path, "gravel", **SMALL)
    extra = path / "train" / "good" / "mine.png"
    extra.write_bytes(b"not generated")
    with pytest.raises(FileExistsError):
        make_texture_dataset(tmp_path, "gravel", **SMALL)
    assert extra.read_bytes() == b"not generated"


def test_incomplete_dataset_raises(tmp_path: Path) -> None:
    path = make_texture_dataset(tmp_path, "brick", **SMALL)
    (path / "test" / "hole" / "000.png").unlink()
    with pytest.raises(FileExistsError):
        make_texture_dataset(tmp_path, "brick", **SMALL)


def test_existing_file_in_place_of_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "brick").write_text("a file")
    with pytest.raises(FileExistsError):
        make_texture_dataset(tmp_path, "brick", **SMALL)
    assert (tmp_path / "brick").read_text() == "a file"


def test_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "brick").mkdir()
    path = make_texture_dataset(tmp_path, "brick", **SMALL)
    assert (path / "manifest.json").is_file()


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(texture_dataset, "paint_defect", explode)
    with pytest.raises(KeyboardInterrupt):
        make_texture_dataset(tmp_path, "brick", **SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (make_texture_dataset(tmp_path, "brick", **SMALL) / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"category": "wood"}, "category"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"n_train": -1}, "n_train"),
        ({"n_test_good": -2}, "n_test_good"),
        ({"n_test_defect_per_type": -1}, "n_test_defect_per_type"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path: Path, kwargs: dict[str, object], parameter: str) -> None:
    params: dict[str, object] = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=parameter):
        make_texture_dataset(tmp_path, **params)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_unknown_category_lists_valid_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category") as excinfo:
        make_texture_dataset(tmp_path, "wood")
    for category in TEXTURE_CATEGORIES:
        assert category in str(excinfo.value)


def test_non_integer_size_raises_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="image_size"):
        make_texture_dataset(tmp_path, "brick", image_size=64.0)  # type: ignore[arg-type]


def test_zero_counts_are_allowed(tmp_path: Path) -> None:
    path = make_texture_dataset(tmp_path, "brick", image_size=32, n_train=1, n_test_good=0, n_test_defect_per_type=0)
    assert len(list(path.rglob("*.png"))) == 1


def test_default_dataset_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADTR_ANOMALIB_DATA", str(tmp_path / "custom"))
    assert default_dataset_root() == tmp_path / "custom"
    monkeypatch.delenv("ADTR_ANOMALIB_DATA")
    assert default_dataset_root() == Path.home() / ".cache" / "adtr_anomalib" / "textures"
    monkeypatch.setenv("ADTR_ANOMALIB_DATA", "")
    assert default_dataset_root() == Path.home() / ".cache" / "adtr_anomalib" / "textures"


def test_permissions_follow_umask(tmp_path: Path) -> None:
    path = make_texture_dataset(tmp_path, "brick", **SMALL)
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_anomalib_mvtec_reader_accepts_the_layout(small_dataset: Path) -> None:
    # Imported here: the texture module itself needs no torch/anomalib, but the plugin's users read it with anomalib.
    from anomalib.data.datasets.image.mvtecad import MVTecADDataset

    train = MVTecADDataset(root=small_dataset.parent, category="brick", split="train")
    test = MVTecADDataset(root=small_dataset.parent, category="brick", split="test")
    assert len(train) == SMALL["n_train"]
    assert len(test) == SMALL["n_test_good"] + SMALL["n_test_defect_per_type"] * len(DEFECT_TYPES)
    samples = test.samples
    abnormal = samples[samples.label_index == 1]
    assert sorted(set(abnormal.label)) == sorted(DEFECT_TYPES)
    for image_path, mask_path in zip(abnormal.image_path, abnormal.mask_path, strict=True):
        assert Path(mask_path).name == Path(image_path).stem + "_mask.png"
        assert Path(mask_path).parent.name == Path(image_path).parent.name
    item = test[int(abnormal.index[0])]
    assert tuple(item.image.shape) == (3, SMALL["image_size"], SMALL["image_size"])
    assert bool(item.gt_label)
    assert int(item.gt_mask.sum()) > 0


def _defect_example(
    category: str, defect: str, *, image_size: int = 128, seed: int = 0
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], BoolMask]:
    """Return ``(clean, defective, mask)`` for one test sample, so tests can check the mask marks the change.

    Uses the same code path as ``make_texture_dataset`` but keeps the clean image, which is never written.
    """
    if category not in TEXTURE_CATEGORIES:
        msg = f"category must be one of {TEXTURE_CATEGORIES}; got {category!r}"
        raise ValueError(msg)
    if defect not in DEFECT_TYPES:
        msg = f"defect must be one of {DEFECT_TYPES}; got {defect!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    _, test_rows = bands(source_photo(category).shape[0])
    clean = normal_sample(category, test_rows, image_size, rng)
    defective, mask = paint_defect(clean, defect, category, rng)
    return to_uint8(clean), to_uint8(defective), mask
