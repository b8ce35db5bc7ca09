"""ADTRPlus as an anomalib model: registration, arguments, starting from an ADTR checkpoint, training through
anomalib's Engine with every kind of training anomaly, and inference identical to ADTR's."""

import logging
import os
from pathlib import Path

import anomalib.models
import pytest
import torch
from anomalib import LearningType
from anomalib.data import Folder, ImageBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.models import get_model, list_models
from anomalib.models.components import AnomalibModule

from adtr_anomalib import ADTR, ADTRModel, ADTRPlus
from adtr_anomalib.data import ConfettiNoise, FolderWithAnomalies, WithAnomalies, make_texture_dataset
from adtr_anomalib.models.adtr_plus.loss import masks_to_token_labels, pseudo_huber_error
from tests.conftest import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
BACKBONE = "tf_efficientnet_lite0"
TINY_PLUS = {"backbone": BACKBONE, "layers": ["blocks.2"], "pre_trained": False, **TINY, "dropout": 0.0, "bf16": False}


def _tiny(cls: type, **kwargs) -> AnomalibModule:
    return cls(**{**TINY_PLUS, **kwargs}, pre_processor=cls.configure_pre_processor((SIZE, SIZE), BACKBONE))


def _engine(root: Path) -> Engine:
    return Engine(
        default_root_dir=root,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("textures")
    make_texture_dataset(root, "brick", image_size=SIZE, n_train=8, n_test_good=2, n_test_defect_per_type=2, seed=2)
    return root


def _mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=16, num_workers=0, seed=0)


# --- anomalib integration --------------------------------------------------------------------------------------


def test_registered_like_adtr() -> None:
    assert isinstance(get_model("adtr_plus", **TINY_PLUS), ADTRPlus)
    assert "ADTRPlus" in list_models("pascal")
    assert anomalib.models.ADTRPlus is ADTRPlus
    assert "ADTRPlus" in anomalib.models.__all__
    # ADTR's constructor arguments are ADTR+'s too (one list); AnomalibModule stays a direct base for anomalib.
    assert ADTRPlus.__bases__ == (ADTR, AnomalibModule)
    model = _tiny(ADTRPlus)
    assert model.learning_type == LearningType.ONE_CLASS
    assert type(model.model) is ADTRModel


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="supervision must be"):
        _tiny(ADTRPlus, supervision="pixels")
    with pytest.raises(ValueError, match="mask_threshold"):
        _tiny(ADTRPlus, mask_threshold=0.0)
    with pytest.raises(ValueError, match="alpha"):
        _tiny(ADTRPlus, alpha=-1.0)
    with pytest.raises(ValueError, match="loss_reduction='mean' is ADTR's"):
        _tiny(ADTRPlus, loss_reduction="mean")


def test_inference_is_adtr_inference() -> None:
    """Same ADTRModel and the same forward pass (pre-processing, network, post-processing) as ADTR."""
    torch.manual_seed(0)
    plus = _tiny(ADTRPlus).eval()
    adtr = _tiny(ADTR).eval()
    adtr.model.load_state_dict(plus.model.state_dict())
    images = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        ours, theirs = plus(images), adtr(images)
    torch.testing.assert_close(ours.anomaly_map, theirs.anomaly_map)
    torch.testing.assert_close(ours.pred_score, theirs.pred_score)


# --- starting from an ADTR checkpoint -------------------------------------------------------------------------


def _toy_batch() -> ImageBatch:
    """Two normal images and two with a pasted uniform patch, labelled with its mask."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, SIZE, SIZE)
    masks = torch.zeros(4, SIZE, SIZE, dtype=torch.bool)
    masks[2:, 16:32, 16:48] = True
    images[2:, :, 16:32, 16:48] = torch.rand(2, 3, 1, 1)
    return ImageBatch(image=images, gt_mask=masks, gt_label=torch.tensor([False, False, True, True]))


def _train_adtr_checkpoint(path: Path) -> ADTR:
    """A normal-only ADTR, trained briefly on the normal toy images, saved like a Lightning checkpoint."""
    torch.manual_seed(1)
    adtr = _tiny(ADTR)
    batch = _toy_batch()
    normal = ImageBatch(image=batch.image[:2], gt_label=batch.gt_label[:2])
    optimizer = torch.optim.AdamW(adtr.model.reconstructor.parameters(), lr=3e-3)
    adtr.train()
    for _ in range(30):
        loss = adtr.training_step(normal)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {f"model.{key}": value for key, value in adtr.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(adtr.hparams)}, path)
    return adtr


def test_start_from_adtr_checkpoint_then_one_step_pulls_normal_and_pushes_anomalous(tmp_path: Path) -> None:
    path = tmp_path / "adtr.ckpt"
    adtr = _train_adtr_checkpoint(path)
    plus = _tiny(ADTRPlus, adtr_checkpoint=str(path))
    plus.on_fit_start()
    assert bool(plus.adtr_checkpoint_loaded)
    for key, value in adtr.model.state_dict().items():
        torch.testing.assert_close(plus.model.state_dict()[key], value)

    batch = _toy_batch()

    def token_errors() -> tuple[float, float]:
        with torch.no_grad():
            features = plus.model.extract_features(batch.image)
            error = pseudo_huber_error(features, plus.model.reconstruct(features))
        anomalous = masks_to_token_labels(batch.gt_mask, error.shape[-2:]).bool()
        return error[~anomalous].mean().item(), error[anomalous].mean().item()

    normal_before, anomalous_before = token_errors()
    optimizer = torch.optim.SGD(plus.model.reconstructor.parameters(), lr=0.1)
    plus.train()
    loss = plus.training_step(batch)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    normal_after, anomalous_after = token_errors()
    assert normal_after < normal_before
    assert anomalous_after > anomalous_before


def test_adtr_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=r"adtr_checkpoint '.*missing\.ckpt' does not exist"):
        _tiny(ADTRPlus, adtr_checkpoint=str(missing)).on_fit_start()
    path = tmp_path / "adtr.ckpt"
    _train_adtr_checkpoint(path)
    with pytest.raises(ValueError, match=r"adtr_checkpoint '.*adtr\.ckpt' does not fit .*'hidden_dim': 32"):
        _tiny(ADTRPlus, adtr_checkpoint=str(path), hidden_dim=64).on_fit_start()
    # Same tensor shapes, other network: caught through the checkpoint's saved arguments.
    with pytest.raises(ValueError, match=r"num_heads=4 there, 2 here"):
        _tiny(ADTRPlus, adtr_checkpoint=str(path), num_heads=2).on_fit_start()
    # A raw state dict has no saved arguments; the shapes still catch another image size.
    raw = tmp_path / "raw.pt"
    torch.save(_tiny(ADTR).model.state_dict(), raw)
    bigger = ADTRPlus.configure_pre_processor((96, 96), BACKBONE)
    plus = ADTRPlus(**TINY_PLUS, adtr_checkpoint=str(raw), pre_processor=bigger)
    with pytest.raises(
        ValueError, match=r"raw\.pt' does not fit .*pos_embed: \(1, 16, 32\) in the file, \(1, 36, 32\)"
    ):
        plus.on_fit_start()
    garbage = tmp_path / "notes.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"adtr_checkpoint '.*notes\.ckpt' could not be read"):
        _tiny(ADTRPlus, adtr_checkpoint=str(garbage)).on_fit_start()


def test_restored_adtr_plus_is_not_reset_to_the_adtr_start(tmp_path: Path) -> None:
    path = tmp_path / "adtr.ckpt"
    _train_adtr_checkpoint(path)
    plus = _tiny(ADTRPlus, adtr_checkpoint=str(path))
    plus.adtr_checkpoint_loaded.fill_(True)  # as restored from an ADTR+ checkpoint
    before = {k: v.clone() for k, v in plus.model.state_dict().items()}
    path.unlink()  # the starting point may be gone on the machine that restores the model
    plus.on_fit_start()
    for key, value in before.items():
        torch.testing.assert_close(plus.model.state_dict()[key], value)


# --- training through anomalib's Engine -----------------------------------------------------------------------


def test_engine_fit_from_real_adtr_checkpoint_with_confetti_turns_cache_off(
    textures: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _engine(tmp_path / "adtr")
    adtr = _tiny(ADTR)
    engine.fit(adtr, datamodule=_mvtec(textures))
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    assert Path(checkpoint).is_file()
    # The mixin rebuilds the network for the checkpoint's image size (64, not the default 256) on reload.
    assert ADTR.load_from_checkpoint(checkpoint).model.input_size == (SIZE, SIZE)

    plus = _tiny(ADTRPlus, adtr_checkpoint=checkpoint)
    datamodule = WithAnomalies(_mvtec(textures), synthetic_anomalies=ConfettiNoise(probability=1.0))
    engine = _engine(tmp_path / "plus")
    with caplog.at_level(logging.INFO):
        engine.fit(plus, datamodule=datamodule)
    assert bool(plus.adtr_checkpoint_loaded)
    assert not plus.feature_cache.enabled
    assert "feature cache off because the training images change every epoch" in caplog.text
    assert engine.trainer.global_step == 1
    results = engine.test(plus, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(results[0])

    # The trained ADTR+ checkpoint reloads offline, without the ADTR file it started from.
    Path(checkpoint).unlink()
    restored = ADTRPlus.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path)
    restored.on_fit_start()
    assert bool(restored.adtr_checkpoint_loaded)
    for key, value in plus.model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[key], value)


def test_engine_fit_with_image_labels_and_no_masks_anywhere(textures: Path, tmp_path: Path) -> None:
    """Image-level path: no mask directory at all; anomalous training images with labels only."""
    src = textures / "brick"
    datamodule = FolderWithAnomalies(
        name="bricks",
        root=src,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=["test/scratch", "test/hole"],
        train_abnormal_dir=["test/stain", "test/foreign"],
        train_batch_size=16,
        eval_batch_size=16,
        num_workers=0,
        seed=0,
    )
    plus = _tiny(ADTRPlus)
    engine = _engine(tmp_path)
    engine.fit(plus, datamodule=datamodule)
    assert datamodule.train_data.task.value == "classification"
    assert plus.feature_cache.enabled  # real images only: the feature cache stays on
    assert engine.trainer.global_step == 1
    assert torch.isfinite(engine.trainer.callback_metrics["train_loss"])


def test_pixel_supervision_without_masks_fails_before_training(textures: Path, tmp_path: Path) -> None:
    datamodule = WithAnomalies(
        Folder(
            name="bricks",
            root=textures / "brick",
            normal_dir="train/good",
            abnormal_dir="test/scratch",
            normal_test_dir="test/good",
            train_batch_size=16,
            eval_batch_size=16,
            num_workers=0,
            seed=0,
        ),
        move_from_test=1,
    )
    plus = _tiny(ADTRPlus, supervision="pixel")
    engine = _engine(tmp_path)
    with pytest.raises(ValueError, match="supervision='pixel' needs pixel masks"):
        engine.fit(plus, datamodule=datamodule)
    assert engine.trainer.global_step == 0
