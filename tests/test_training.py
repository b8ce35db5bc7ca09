"""ADTR trained through anomalib's Engine: it learns, the backbone stays frozen, checkpoints reload offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from anomalib.deploy import ExportType
from anomalib.engine import Engine

import adtr_anomalib.models.adtr.components.backbone as components
from adtr_anomalib import ADTR
from adtr_anomalib.metrics import inspection_evaluator
from tests.helpers import fit, raw_aurocs, small_adtr, state_equal

EPOCHS = 10
OPTIONS = {"feature_stride": 8, "lr": 2e-3}  # 16 x 16 tokens at 128 px


@pytest.fixture(scope="module")
def trained(textures_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    model = small_adtr(evaluator=inspection_evaluator(), **OPTIONS)
    before = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    untrained = small_adtr(**OPTIONS)
    untrained.model.load_state_dict(model.model.state_dict())  # same random transformer, never trained
    untrained.model.load_backbone_weights()
    engine = fit(model, textures_root, EPOCHS, tmp_path_factory.mktemp("train"))
    return {"model": model, "engine": engine, "before": before, "untrained": untrained}


def test_backbone_is_frozen_during_training(trained: dict) -> None:
    model: ADTR = trained["model"]
    after = model.model.feature_extractor.state_dict()
    assert state_equal(trained["before"], after) is False  # ImageNet weights were loaded when training started
    reloaded = small_adtr(**OPTIONS)
    reloaded.model.load_backbone_weights()
    assert state_equal(reloaded.model.feature_extractor.state_dict(), after)  # ...and never changed after that
    assert not any(p.requires_grad for p in model.model.feature_extractor.parameters())
    optimised = {id(p) for group in trained["engine"].trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.model.reconstructor.parameters()}


def test_training_beats_untrained_and_random_weight_models(trained: dict, textures_root: Path) -> None:
    image, pixel = raw_aurocs(trained["model"], textures_root)
    _, untrained_pixel = raw_aurocs(trained["untrained"], textures_root)
    random = small_adtr(pre_trained=False, **OPTIONS)  # random backbone and transformer
    random_image, random_pixel = raw_aurocs(random, textures_root)
    assert pixel >= 0.94, (image, pixel)
    assert pixel >= untrained_pixel + 0.02, (pixel, untrained_pixel)
    assert pixel >= random_pixel + 0.1, (pixel, random_pixel)
    assert image >= 0.8, image
    assert image > random_image, (image, random_image)


def test_engine_metrics_are_computed_on_normalised_scores(trained: dict, textures_root: Path) -> None:
    """anomalib's AUROC squashes raw scores through a sigmoid (AUROC 0.5); the post-processor prevents that."""
    from adtr_anomalib.data import mvtec_layout_folder

    metrics = trained["engine"].test(trained["model"], datamodule=mvtec_layout_folder(textures_root), verbose=False)[0]
    image, pixel = raw_aurocs(trained["model"], textures_root)
    assert metrics["image_AUROC"] == pytest.approx(image, abs=0.02)
    assert metrics["pixel_AUROC"] == pytest.approx(pixel, abs=0.02)
    assert 0.0 < metrics["pixel_AUPRO"] <= 1.0


def forbid_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way to backbone weights fail: a weights file, a packaged file, timm's hub.

    Patched where ``load_backbone_weights`` looks them up at call time (module globals of ``components``), so the
    guard holds however the caller imported ``load_backbone_weights``.
    """

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("backbone weights were read although the checkpoint holds them")

    monkeypatch.setattr(components, "_read_state_dict", no_weights)
    monkeypatch.setattr(components, "_download_timm_weights", no_weights)
    original_create = timm.create_model
    monkeypatch.setattr(
        timm, "create_model", lambda *a, **k: no_weights() if k.get("pretrained") else original_create(*a, **k)
    )


def test_weight_guard_catches_a_load_through_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control of the guard below: the model's own loading path (packaged Lite0 file) is intercepted."""
    forbid_weight_loading(monkeypatch)
    model = small_adtr(**OPTIONS)
    with pytest.raises(AssertionError, match="backbone weights were read"):
        model.model.load_backbone_weights()
    with pytest.raises(AssertionError, match="backbone weights were read"):
        components.load_backbone_weights(model.model.feature_extractor.feature_extractor, "resnet18")


def test_checkpoint_reloads_and_exports_offline_without_fetching_weights(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = Path(trained["engine"].trainer.checkpoint_callback.best_model_path)
    assert checkpoint.is_file()
    forbid_weight_loading(monkeypatch)
    # As with anomalib's own models, a non-default evaluator is passed again (its metric state is in the file).
    loaded = ADTR.load_from_checkpoint(checkpoint, weights_only=True, evaluator=inspection_evaluator()).eval()
    model = trained["model"].eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected, actual = model.model(images), loaded.model(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    # A model built from defaults (pre_trained=True, as `anomalib export --model ADTR` does) fetches nothing either.
    assert not bool(ADTR(backbone="resnet18", layers=["layer2"]).model.backbone_weights_loaded)
    exported = Engine(default_root_dir=tmp_path, logger=False).export(
        model=loaded, export_type=ExportType.TORCH, export_root=tmp_path
    )
    assert exported is not None
    assert Path(exported).is_file()
