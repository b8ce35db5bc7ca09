"""``normalize_map``: the anomaly map standardised at every pixel by the maps of normal training images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import FolderWithAnomalies, mvtec_layout_folder
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.helpers import make_folder, onnx_outputs, tiny_adtr, tiny_engine, tiny_torch_model


def _features(model: ADTRModel, images: torch.Tensor) -> list[torch.Tensor]:
    return [model.extract_features(batch) for batch in images.split(3)]


def test_statistics_are_the_per_pixel_mean_and_std_of_the_training_maps() -> None:
    torch.manual_seed(0)
    model = tiny_torch_model(normalize_map=True, map_layers=["blocks.1"])
    raw = tiny_torch_model(map_layers=["blocks.1"])
    raw.load_state_dict(model.state_dict())
    train = torch.rand(7, 3, 32, 32)
    model.fit_map_statistics(_features(model, train))
    assert bool(model.map_statistics_fitted)

    features = model.extract_features(train)
    pixel, full = model.raw_maps(features, model.reconstruct(features))
    maps = torch.cat([pixel, full], dim=1)  # (N, 2, H, W)
    torch.testing.assert_close(model.map_mean, maps.mean(dim=0))
    torch.testing.assert_close(model.map_std, maps.std(dim=0, unbiased=False), rtol=1e-4, atol=1e-6)

    # The same fit from one batch: sums in float64, so batching does not matter.
    single = tiny_torch_model(normalize_map=True, map_layers=["blocks.1"])
    single.load_state_dict(model.state_dict())
    single.fit_map_statistics([features])
    torch.testing.assert_close(single.map_std, model.map_std)

    test = torch.rand(2, 3, 32, 32)
    out, before = model(test), raw(test)
    torch.testing.assert_close(out.anomaly_map, (before.anomaly_map - model.map_mean[0]) / model.map_std[0])
    features = model.extract_features(test)
    full = model.raw_maps(features, model.reconstruct(features))[1]
    expected = model.anomaly_map_generator.compute_score((full - model.map_mean[1]) / model.map_std[1])
    torch.testing.assert_close(out.pred_score, expected)
    assert not torch.allclose(out.pred_score, before.pred_score)


def test_off_or_unfitted_the_map_is_the_papers() -> None:
    torch.manual_seed(0)
    plain = tiny_torch_model()
    fitted_but_off = tiny_torch_model()
    fitted_but_off.load_state_dict(plain.state_dict())
    fitted_but_off.fit_map_statistics(_features(fitted_but_off, torch.rand(4, 3, 32, 32)))
    unfitted = tiny_torch_model(normalize_map=True)
    unfitted.load_state_dict(plain.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 32)
    for model in (fitted_but_off, unfitted):
        torch.testing.assert_close(model(images).anomaly_map, plain(images).anomaly_map)
        torch.testing.assert_close(model(images).pred_score, plain(images).pred_score)
    assert not bool(unfitted.map_statistics_fitted)
    assert bool(fitted_but_off.map_statistics_fitted)  # fitted, yet off: the paper's map above


def test_a_place_hot_in_every_normal_image_stops_outscoring_a_small_defect() -> None:
    """An aligned part: every image has the same bright stripe (high reconstruction error in every normal image);
    the defect is a small dim patch elsewhere. Standardised, the defect is the hottest place; raw, the stripe is."""
    torch.manual_seed(0)
    model = tiny_torch_model(64, normalize_map=True)
    raw = tiny_torch_model(64)
    raw.load_state_dict(model.state_dict())

    def part(n: int) -> torch.Tensor:
        images = 0.3 + 0.02 * torch.randn(n, 3, 64, 64)
        images[:, :, :, 8:16] = 3.0  # the stripe, in every image
        return images

    model.fit_map_statistics(_features(model, part(12)))
    defective = part(1)
    defective[:, :, 40:48, 40:48] = 0.8
    defect = torch.zeros(64, 64, dtype=torch.bool)
    defect[36:52, 36:52] = True  # the patch and the reach of its features on the stride-8 grid
    stripe = torch.zeros(64, 64, dtype=torch.bool)
    stripe[:, 4:20] = True

    def hottest(anomaly_map: torch.Tensor) -> tuple[int, int]:
        index = int(anomaly_map[0, 0].argmax())
        return index // 64, index % 64

    row, col = hottest(raw(defective).anomaly_map)
    assert stripe[row, col], "control: without the statistics the stripe must be the hottest place"
    row, col = hottest(model(defective).anomaly_map)
    assert defect[row, col]
    assert model(defective).pred_score > model(part(1)).pred_score


def test_fewer_than_two_normal_images_is_a_clear_error() -> None:
    model = tiny_torch_model(normalize_map=True)
    with pytest.raises(ValueError, match="need at least 2 normal training images"):
        model.fit_map_statistics(_features(model, torch.rand(1, 3, 32, 32)))
    assert not bool(model.map_statistics_fitted)


def test_training_fits_them_once_per_weights_and_the_checkpoint_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder(tmp_path / "part", n_train=6)
    model = tiny_adtr(pre_trained=False, normalize_map=True)
    fits = []
    original = model.model.fit_map_statistics
    monkeypatch.setattr(
        model.model, "fit_map_statistics", lambda features, **kw: fits.append(1) or original(features, **kw)
    )
    engine = tiny_engine(tmp_path / "results", max_epochs=2, check_val_every_n_epoch=2)
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=3, eval_batch_size=4, seed=0))
    # Validation after the last epoch, the end of that epoch and the end of training see the same weights.
    assert len(fits) == 1
    assert bool(model.model.map_statistics_fitted)
    restored = ADTR.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path)
    assert restored.model.normalize_map
    for name in ("map_mean", "map_std", "map_statistics_fitted"):
        torch.testing.assert_close(getattr(restored.model, name), getattr(model.model, name))


def test_a_run_without_validation_saves_fitted_statistics(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False, normalize_map=True)
    engine = tiny_engine(tmp_path / "results", limit_val_batches=0)
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0))
    checkpoint = torch.load(engine.trainer.checkpoint_callback.last_model_path or _only_checkpoint(tmp_path))
    assert bool(checkpoint["state_dict"]["model.map_statistics_fitted"])


def _only_checkpoint(root: Path) -> Path:
    (path,) = root.rglob("*.ckpt")
    return path


def test_adtr_plus_fits_them_on_its_normal_training_images_only(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4, n_test=3)
    shutil.copytree(root / "test" / "defect", root / "train_defect")  # labelled anomalies for training
    shutil.copytree(root / "ground_truth" / "defect", root / "ground_truth" / "train_defect")
    datamodule = FolderWithAnomalies(
        name="part",
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        mask_dir="ground_truth/defect",
        train_abnormal_dir="train_defect",
        train_mask_dir="ground_truth/train_defect",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )
    plus = tiny_adtr(model_class=ADTRPlus, pre_trained=False, normalize_map=True)
    tiny_engine(tmp_path / "results").fit(model=plus, datamodule=datamodule)
    assert bool(plus.model.map_statistics_fitted)
    normal_only = tiny_torch_model(normalize_map=True, layers=plus.model.layers)
    normal_only.load_state_dict(plus.model.state_dict())
    normal = mvtec_layout_folder(root, train_batch_size=4, seed=0)  # the same train/good images, nothing else
    normal.setup()
    normal_only.fit_map_statistics(
        normal_only.extract_features(plus.pre_processor(batch.image)) for batch in normal.train_dataloader()
    )
    torch.testing.assert_close(plus.model.map_mean, normal_only.map_mean)
    torch.testing.assert_close(plus.model.map_std, normal_only.map_std)


@pytest.mark.slow
def test_the_statistics_travel_with_an_onnx_export(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False, normalize_map=True)
    engine = tiny_engine(tmp_path / "results")
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0))
    assert bool(model.model.map_statistics_fitted)
    assert not torch.equal(model.model.map_mean, torch.zeros_like(model.model.map_mean))
    images = torch.rand(3, 3, 32, 32)
    outputs = onnx_outputs(model, tmp_path / "export", images)
    with torch.no_grad():
        expected = model.eval()(images)
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(outputs["pred_score"], expected.pred_score.numpy(), atol=1e-4, rtol=1e-4)
