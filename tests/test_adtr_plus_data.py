"""Training-set anomalies for ADTR+: Folder with anomalies, moving test anomalies (MVTecAD, Visa, Folder),
on-the-fly synthetic anomalies (confetti noise, Perlin), image-level labels without masks."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD, Visa
from anomalib.data.utils.generators import PerlinAnomalyGenerator
from PIL import Image

from adtr_anomalib.data import (
    DEFECT_TYPES,
    AnomalyInjectionDataset,
    ConfettiNoise,
    FolderWithAnomalies,
    WithAnomalies,
    make_texture_dataset,
    move_test_anomalies_to_train,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_TEST_PER_DEFECT = 4
N_TEST_GOOD = 4
N_TRAIN = 8


def _paths(dataset) -> set[str]:
    return {str(Path(p).resolve()) for p in dataset.samples["image_path"]}


def _loader_kwargs() -> dict:
    return {"train_batch_size": 64, "eval_batch_size": 64, "num_workers": 0}


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small brick dataset in MVTec-AD layout (4 defect types x 4 test images)."""
    root = tmp_path_factory.mktemp("textures")
    make_texture_dataset(
        root,
        "brick",
        image_size=64,
        n_train=N_TRAIN,
        n_test_good=N_TEST_GOOD,
        n_test_defect_per_type=N_TEST_PER_DEFECT,
        seed=1,
    )
    return root


@pytest.fixture(scope="module")
def folder_root(textures: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder layout: scratch/hole anomalies for test, stain/foreign ones given for training."""
    src = textures / "brick"
    root = tmp_path_factory.mktemp("folder")
    for sub in ("train/good", "test/good"):
        shutil.copytree(src / sub, root / sub)
    for defect in ("scratch", "hole"):
        shutil.copytree(src / "test" / defect, root / "test" / defect)
        shutil.copytree(src / "ground_truth" / defect, root / "ground_truth" / defect)
    for defect in ("stain", "foreign"):
        for image in sorted((src / "test" / defect).glob("*.png")):
            (root / "train_defects").mkdir(exist_ok=True)
            (root / "train_masks").mkdir(exist_ok=True)
            shutil.copy(image, root / "train_defects" / f"{defect}_{image.name}")
            mask = src / "ground_truth" / defect / f"{image.stem}_mask.png"
            shutil.copy(mask, root / "train_masks" / f"{defect}_{image.stem}_mask.png")
    return root


def _folder(root: Path, **kwargs) -> Folder:
    args = {
        "name": "bricks",
        "root": root,
        "normal_dir": "train/good",
        "normal_test_dir": "test/good",
        "abnormal_dir": ["test/scratch", "test/hole"],
        "mask_dir": ["ground_truth/scratch", "ground_truth/hole"],
        "seed": 0,
        **_loader_kwargs(),
        **kwargs,
    }
    cls = FolderWithAnomalies if "train_abnormal_dir" in kwargs else Folder
    return cls(**args)


def _mvtec(textures: Path) -> MVTecAD:
    return MVTecAD(root=textures, category="brick", seed=0, **_loader_kwargs())


# --- moving anomalies from test to train ------------------------------------------------------------------


def test_move_from_mvtec_test_has_zero_overlap_and_labels_and_masks(textures: Path) -> None:
    plain = _mvtec(textures)
    plain.setup()
    datamodule = WithAnomalies(_mvtec(textures), move_from_test=2, seed=0)
    datamodule.setup()
    moved = datamodule.moved_anomalies
    assert sorted(moved["defect_type"].value_counts().items()) == [(d, 2) for d in sorted(DEFECT_TYPES)]
    moved_paths = {str(Path(p).resolve()) for p in moved["image_path"]}
    assert len(moved_paths) == 2 * len(DEFECT_TYPES)
    assert not moved_paths & _paths(datamodule.test_data)
    assert not moved_paths & _paths(datamodule.val_data)  # MVTecAD's validation set is a copy of test
    assert moved_paths <= _paths(datamodule.train_data)
    assert _paths(datamodule.test_data) == _paths(plain.test_data) - moved_paths
    assert _paths(datamodule.train_data) == _paths(plain.train_data) | moved_paths

    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is not None
    for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask, strict=True):
        is_moved = str(Path(path).resolve()) in moved_paths
        assert bool(label) == is_moved
        assert bool(mask.any()) == is_moved  # moved images bring their masks, normal ones get empty masks
    row = moved.iloc[0]
    item = datamodule.train_data[list(datamodule.train_data.samples["image_path"]).index(row["image_path"])]
    expected = np.asarray(Image.open(row["mask_path"])) > 0
    assert np.array_equal(item.gt_mask.numpy(), expected)


def test_move_is_seeded_and_reproducible(textures: Path) -> None:
    def moved(seed: int) -> list[str]:
        datamodule = WithAnomalies(_mvtec(textures), move_from_test=1, seed=seed)
        datamodule.setup()
        return list(datamodule.moved_anomalies["image_path"])

    first = moved(0)
    assert moved(0) == first
    assert moved(1) != first


def test_held_out_moves_give_the_same_test_set_without_training_anomalies(textures: Path) -> None:
    trained = WithAnomalies(_mvtec(textures), move_from_test=1, seed=3)
    held_out = WithAnomalies(_mvtec(textures), move_from_test=1, seed=3, train_on_moved=False)
    trained.setup()
    held_out.setup()
    assert _paths(held_out.test_data) == _paths(trained.test_data)
    assert not held_out.train_data.has_anomalous
    assert trained.train_data.has_anomalous


def test_move_from_folder_after_setup(folder_root: Path) -> None:
    """The Python API on an already set-up Folder; Folder draws validation images from test."""
    datamodule = _folder(folder_root, val_split_mode="from_test", val_split_ratio=0.5)
    datamodule.setup()
    test_before = _paths(datamodule.test_data) | _paths(datamodule.val_data)
    moved = move_test_anomalies_to_train(datamodule, per_defect_type=1, seed=0)
    assert sorted(moved["defect_type"]) == ["hole", "scratch"]
    moved_paths = {str(Path(p).resolve()) for p in moved["image_path"]}
    assert moved_paths <= test_before
    assert not moved_paths & (_paths(datamodule.test_data) | _paths(datamodule.val_data))
    assert moved_paths <= _paths(datamodule.train_data)
    assert datamodule.train_data.task.value == "segmentation"
    with pytest.raises(RuntimeError, match="already moved"):
        move_test_anomalies_to_train(datamodule, per_defect_type=1)


def test_move_from_visa(textures: Path, tmp_path: Path) -> None:
    """VisA's processed layout (visa_pytorch/<category>/{train,test,ground_truth}/..., one 'bad' type)."""
    src = textures / "brick"
    category = tmp_path / "visa_pytorch" / "brick"
    shutil.copytree(src / "train" / "good", category / "train" / "good")
    shutil.copytree(src / "test" / "good", category / "test" / "good")
    for defect in DEFECT_TYPES:
        for image in sorted((src / "test" / defect).glob("*.png")):
            (category / "test" / "bad").mkdir(parents=True, exist_ok=True)
            (category / "ground_truth" / "bad").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, category / "test" / "bad" / f"{defect}{image.name}")
            shutil.copy(
                src / "ground_truth" / defect / f"{image.stem}_mask.png",
                category / "ground_truth" / "bad" / f"{defect}{image.name}",
            )
    datamodule = WithAnomalies(Visa(root=tmp_path, category="brick", seed=0, **_loader_kwargs()), move_from_test=3)
    datamodule.setup()
    moved_paths = {str(Path(p).resolve()) for p in datamodule.moved_anomalies["image_path"]}
    assert len(moved_paths) == 3
    assert set(datamodule.moved_anomalies["defect_type"]) == {"bad"}
    assert not moved_paths & (_paths(datamodule.test_data) | _paths(datamodule.val_data))
    assert int(datamodule.train_data.samples["label_index"].sum()) == 3


def test_move_errors_name_the_problem(textures: Path) -> None:
    with pytest.raises(ValueError, match=r"move_from_test=5 but the test split has only 4 images of defect type"):
        WithAnomalies(_mvtec(textures), move_from_test=5).setup()
    with pytest.raises(ValueError, match="move_from_test must be a non-negative integer"):
        WithAnomalies(_mvtec(textures), move_from_test=-1)
    with pytest.raises(RuntimeError, match=r"call datamodule\.setup"):
        move_test_anomalies_to_train(_mvtec(textures), per_defect_type=1)


# --- Folder with anomalies given for training ---------------------------------------------------------------


def test_folder_with_training_anomalies_and_masks(folder_root: Path) -> None:
    plain = _folder(folder_root)
    plain.setup()
    datamodule = _folder(folder_root, train_abnormal_dir="train_defects", train_mask_dir="train_masks")
    datamodule.setup()
    given = {str(p.resolve()) for p in (folder_root / "train_defects").glob("*.png")}
    assert len(given) == 2 * N_TEST_PER_DEFECT
    assert _paths(datamodule.train_data) == _paths(plain.train_data) | given
    assert _paths(datamodule.test_data) == _paths(plain.test_data)
    assert not given & (_paths(datamodule.test_data) | _paths(datamodule.val_data))
    batch = next(iter(datamodule.train_dataloader()))
    labels = batch.gt_label.bool()
    assert int(labels.sum()) == len(given)
    assert all(mask.any() for mask in batch.gt_mask[labels])
    assert not batch.gt_mask[~labels].any()


def test_folder_with_training_anomalies_without_masks_has_image_labels_only(folder_root: Path) -> None:
    datamodule = _folder(folder_root, train_abnormal_dir="train_defects")
    datamodule.setup()
    assert datamodule.train_data.task.value == "classification"
    assert datamodule.test_data.task.value == "segmentation"  # the test split keeps its masks
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is None
    assert int(batch.gt_label.sum()) == 2 * N_TEST_PER_DEFECT


def test_folder_with_anomalies_rejects_bad_input(folder_root: Path) -> None:
    with pytest.raises(ValueError, match="also in the test/validation split"):
        _folder(folder_root, train_abnormal_dir="test/scratch", train_mask_dir="ground_truth/scratch").setup()
    with pytest.raises(ValueError, match="train_mask_dir is set but train_abnormal_dir is not"):
        FolderWithAnomalies(name="x", normal_dir="train/good", root=folder_root, train_mask_dir="train_masks")


# --- synthetic anomalies ---------------------------------------------------------------------------------------


def test_confetti_mask_is_exactly_the_pasted_area() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 64, 64)
    generator = ConfettiNoise(probability=1.0, num_rectangles=(2, 5), size=(0.05, 0.2))
    for _ in range(20):
        out, mask = generator(image)
        assert mask.shape == (1, 64, 64)
        assert mask.dtype == torch.bool
        assert mask.any()
        assert torch.equal(out[:, ~mask[0]], image[:, ~mask[0]])  # nothing changed outside the mask
        # inside: pasted colours, constant per rectangle, so few distinct colours
        assert len(torch.unique(out[:, mask[0]], dim=1).T) <= 5
        assert int(mask.sum()) <= 5 * round(0.2 * 64) ** 2


def test_confetti_amount_and_probability_and_seed() -> None:
    image = torch.rand(3, 32, 48)
    out, mask = ConfettiNoise(probability=0.0)(image)
    assert torch.equal(out, image)
    assert not mask.any()
    one = ConfettiNoise(probability=1.0, num_rectangles=(1, 1), size=(0.25, 0.25))
    _, mask = one(image)
    rows, cols = mask[0].any(1).sum(), mask[0].any(0).sum()
    assert (int(rows), int(cols)) == (8, 12)  # 25% of 32 x 48
    torch.manual_seed(5)
    first = one(image)
    torch.manual_seed(5)
    again = one(image)
    assert torch.equal(first[0], again[0])
    assert torch.equal(first[1], again[1])
    images, masks = one(torch.rand(4, 3, 32, 48))
    assert images.shape == (4, 3, 32, 48)
    assert masks.shape == (4, 1, 32, 48)
    with pytest.raises(ValueError, match="probability"):
        ConfettiNoise(probability=2.0)
    with pytest.raises(ValueError, match="num_rectangles"):
        ConfettiNoise(num_rectangles=(3, 1))
    with pytest.raises(ValueError, match="size"):
        ConfettiNoise(size=(0.0, 0.1))


def test_synthetic_anomalies_on_the_fly(textures: Path) -> None:
    datamodule = WithAnomalies(_mvtec(textures), synthetic_anomalies=ConfettiNoise(probability=1.0))
    datamodule.setup()
    plain = _mvtec(textures)
    plain.setup()
    dataset = datamodule.train_data
    assert isinstance(dataset, AnomalyInjectionDataset)
    assert dataset.varies_between_epochs
    assert dataset.name == plain.train_data.name
    torch.manual_seed(0)
    first = dataset[0]
    assert bool(first.gt_label)
    assert first.gt_mask.any()
    original = plain.train_data[0].image
    changed = (first.image != original).any(0)
    assert not changed[~first.gt_mask].any()
    second = dataset[0]  # fresh anomalies every time
    assert not torch.equal(second.gt_mask, first.gt_mask)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_label.all()
    assert all(mask.any() for mask in batch.gt_mask)


def test_synthetic_anomalies_leave_real_anomalies_alone_and_accept_perlin(textures: Path) -> None:
    datamodule = WithAnomalies(
        _mvtec(textures),
        move_from_test=1,
        synthetic_anomalies=[ConfettiNoise(probability=0.0), PerlinAnomalyGenerator(probability=1.0)],
    )
    datamodule.setup()
    samples = datamodule.train_data.samples
    real = int(np.flatnonzero(samples["label_index"].to_numpy() == 1)[0])
    item = datamodule.train_data[real]
    expected = np.asarray(Image.open(samples.iloc[real]["mask_path"])) > 0
    assert np.array_equal(item.gt_mask.numpy(), expected)
    normal = int(np.flatnonzero(samples["label_index"].to_numpy() == 0)[0])
    torch.manual_seed(0)
    item = datamodule.train_data[normal]
    assert bool(item.gt_label)
    assert item.gt_mask.any()


def test_synthetic_anomalies_without_masks_give_image_labels(folder_root: Path) -> None:
    """A classification training set stays one: generated images get label 1 but no mask."""
    datamodule = WithAnomalies(
        _folder(folder_root, train_abnormal_dir="train_defects"),
        synthetic_anomalies=ConfettiNoise(probability=1.0),
    )
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.gt_mask is None
    assert batch.gt_label.all()


def test_synthetic_anomalies_give_masks_to_data_without_any(folder_root: Path) -> None:
    """Folder without masks (classification) and no real training anomalies: generated masks become labels."""
    plain = _folder(folder_root, mask_dir=None)
    datamodule = WithAnomalies(
        _folder(folder_root, mask_dir=None), synthetic_anomalies=ConfettiNoise(probability=0.5), seed=0
    )
    plain.setup()
    datamodule.setup()
    assert plain.train_data.task.value == "classification"
    assert datamodule.train_data.task.value == "segmentation"
    assert datamodule.test_data.task.value == "classification"
    torch.manual_seed(0)
    batch = next(iter(datamodule.train_dataloader()))
    labels = batch.gt_label.bool()
    assert 0 < int(labels.sum()) < len(labels)
    assert all(mask.any() for mask in batch.gt_mask[labels])
    assert not batch.gt_mask[~labels].any()
