"""BSData: the conversion from the public release's layout, offline on a tiny release, and the CLI around it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adtr_anomalib.__main__ import main
from adtr_anomalib.data import bsdata
from adtr_anomalib.data.bsdata import BSData, build_bsdata, file_list_sha256, is_complete
from adtr_anomalib.data.validation import DataError
from tests.conftest import shared_data_set

# A pitting polygon of 40x20 pixels at full size: about 20x10 = 200 pixels once halved.
POLYGON = [[100, 100], [140, 100], [140, 120], [100, 120]]


def _jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=80)


def _release(folder: Path, n_good: int = 10, n_pitting: int = 3) -> Path:
    """A BSData release in the upstream layout with decoys the subset must leave out."""
    (folder / "data").mkdir(parents=True)
    (folder / "label").mkdir()
    entries = []

    def add(name: str, size: tuple[int, int], bsd_type: int, pitting: bool) -> None:
        _jpeg(folder / "data" / name, size, len(entries))
        if pitting:
            shapes = [{"label": "Pitting", "points": POLYGON, "shape_type": "polygon"}]
            (folder / "label" / name.replace(".jpg", ".json")).write_text(json.dumps({"shapes": shapes}))
        entries.append({"filename": name, "type": bsd_type, "annotations": None})

    for i in range(n_good):
        add(f"01_2009{i:02d}_good_crop_2.jpg", bsdata.CAMERA_SIZE, 2, pitting=False)
    for i in range(n_pitting):
        add(f"01_2010{i:02d}_pit_crop_1.jpg", bsdata.CAMERA_SIZE, 2, pitting=True)
    add("01_201100_large_crop_2.jpg", (1540, 645), 2, pitting=False)  # other camera setting
    add("01_201101_type1_crop_2.jpg", bsdata.CAMERA_SIZE, 1, pitting=True)  # other ball-screw type
    entries.append({"filename": "01_201102_missing_crop_2.jpg", "type": 2, "annotations": None})
    (folder / "image_data.json").write_text(json.dumps({"images": entries}))
    return folder


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return _release(tmp_path / "BSData-7204b28")


def test_build_selects_converts_and_splits(release: Path, tmp_path: Path) -> None:
    root = build_bsdata(release, tmp_path / "out", expected_files=None)
    train, test_good = sorted((root / "train/good").iterdir()), sorted((root / "test/good").iterdir())
    pitting, masks = sorted((root / "test/pitting").iterdir()), sorted((root / "ground_truth/pitting").iterdir())
    assert (len(train), len(test_good), len(pitting), len(masks)) == (8, 2, 3, 3)
    assert not {p.name for p in train} & {p.name for p in test_good}
    assert all("type1" not in p.name and "large" not in p.name for p in [*train, *test_good, *pitting])
    assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in pitting]
    with Image.open(train[0]) as image:
        assert (image.size, image.mode, image.format) == ((565, 230), "RGB", "JPEG")
    mask = np.asarray(Image.open(masks[0]))
    assert mask.shape == (230, 565)
    assert set(np.unique(mask)) == {0, 255}
    assert (mask == 255).sum() == pytest.approx(200, rel=0.2)  # a quarter of the polygon's area
    rows, cols = np.nonzero(mask)
    assert (rows.min(), cols.min()) == pytest.approx((50, 50), abs=1)
    # The same release gives the same split, whatever the order of image_data.json.
    again = build_bsdata(release, tmp_path / "again", expected_files=None)
    assert file_list_sha256(again) == file_list_sha256(root)
    assert sorted(p.name for p in (again / "test/good").iterdir()) == [p.name for p in test_good]


def test_build_refuses_another_release_and_keeps_nothing(release: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(DataError, match="not the documented subset"):
        build_bsdata(release, target)  # the official file list cannot match a tiny release
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["BSData-7204b28"]  # no half-built folder left beside it


def test_build_never_overwrites(release: Path, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwrites"):
        build_bsdata(release, target, expected_files=None)
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="not a BSData release"):
        build_bsdata(tmp_path / "mine", tmp_path / "elsewhere", expected_files=None)


def test_datamodule_downloads_once_and_reads_the_build(release: Path, tmp_path: Path, monkeypatch) -> None:
    """prepare_data on a missing folder downloads the archive (served from disk here) and builds the folder; a second
    call finds it complete and downloads nothing."""
    expected = file_list_sha256(build_bsdata(release, tmp_path / "reference", expected_files=None))
    archive = Path(shutil.make_archive(str(tmp_path / "served"), "zip", root_dir=tmp_path, base_dir=release.name))
    downloads: list[str] = []

    def serve(url: str, filename: Path, reporthook) -> None:
        downloads.append(url)
        shutil.copy(archive, filename)

    monkeypatch.setattr(bsdata, "urlretrieve", serve)
    monkeypatch.setattr(bsdata, "FILE_LIST_SHA256", expected)
    datamodule = BSData(root=tmp_path / "datasets" / "bsdata_pitting", val_split_mode="same_as_test")
    datamodule.prepare_data()
    datamodule.prepare_data()
    assert downloads == [bsdata.SOURCE_URL]
    assert is_complete(datamodule.root)
    datamodule.setup()
    assert len(datamodule.train_data) == 8
    assert sorted(datamodule.test_data.samples.label_index.tolist()) == [0, 0, 1, 1, 1]


def test_download_failure_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    def offline(url: str, filename: Path, reporthook) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(bsdata, "urlretrieve", offline)
    with pytest.raises(DataError, match="pass the clone as source"):
        BSData(root=tmp_path / "bsdata").prepare_data()
    assert list(tmp_path.iterdir()) == []  # no archive or scratch folder left behind


def test_cli_builds_and_refuses_clearly(release: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        bsdata, "FILE_LIST_SHA256", file_list_sha256(build_bsdata(release, tmp_path / "ref", expected_files=None))
    )
    assert main(["data", "bsdata", "--root", str(tmp_path / "cli"), "--source", str(release)]) == 0
    assert "ready" in capsys.readouterr().out
    assert main(["data", "bsdata", "--root", str(tmp_path / "cli"), "--source", str(release)]) == 0  # found, kept
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "results.csv").write_text("mine")
    assert main(["data", "bsdata", "--root", str(occupied), "--source", str(release)]) == 2
    err = capsys.readouterr().err
    assert str(occupied) in err
    assert "never overwritten" in err
    assert (occupied / "results.csv").read_text() == "mine"


def test_shared_folder_is_the_documented_build() -> None:
    """The file list the download is checked against is that of the folder the tests and benchmarks use."""
    assert is_complete(shared_data_set("bsdata_pitting"))
