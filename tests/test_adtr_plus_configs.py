"""The ADTR+ configs in configs/adtr_plus/ parse and build through anomalib's own CLI; one runs end to end."""

import os
from pathlib import Path

import pytest
from anomalib.cli import AnomalibCLI
from anomalib.data import MVTecAD
from anomalib.data.utils.generators import PerlinAnomalyGenerator

from adtr_anomalib import ADTRPlus
from adtr_anomalib.data import BSData, ConfettiNoise, FolderWithAnomalies, WithAnomalies, make_texture_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "adtr_plus"

# config -> (wrapped datamodule type, moved per defect type, generator types, supervision)
EXPECTED = {
    "mvtec_confetti.yaml": (MVTecAD, 0, [ConfettiNoise], "pixel"),
    "mvtec_labelled.yaml": (MVTecAD, 5, [], "pixel"),
    "mvtec_image_labels.yaml": (MVTecAD, 5, [], "image"),
    "folder_confetti.yaml": (BSData, 0, [ConfettiNoise, PerlinAnomalyGenerator], "pixel"),
    "folder_labelled.yaml": (BSData, 10, [], "pixel"),
    "folder_train_anomalies.yaml": (FolderWithAnomalies, None, None, "pixel"),
    "folder_image_labels.yaml": (FolderWithAnomalies, None, None, "auto"),
}


def test_every_config_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds(name: str) -> None:
    inner_type, moved, generators, supervision = EXPECTED[name]
    init = AnomalibCLI(["train", "-c", str(CONFIGS / name)], run=False).config_init["train"]
    model, data = init["model"], init["data"]
    assert isinstance(model, ADTRPlus)
    assert model.hparams.backbone == "tf_efficientnet_lite0"
    assert model.hparams.supervision == supervision
    if inner_type is FolderWithAnomalies:
        assert isinstance(data, FolderWithAnomalies)
        assert data.train_abnormal_dir is not None
        assert (data.train_mask_dir is None) == (supervision == "auto")
    else:
        assert isinstance(data, WithAnomalies)
        assert isinstance(data.datamodule, inner_type)
        assert data.move_from_test == moved
        assert [type(g) for g in data.generators] == generators


def test_confetti_config_trains_and_tests_through_the_cli(tmp_path: Path) -> None:
    """``anomalib train -c configs/adtr_plus/mvtec_confetti.yaml`` on the built-in textures, tiny and short."""
    make_texture_dataset(tmp_path / "data", "brick", image_size=64, n_train=8, n_test_good=2, n_test_defect_per_type=1)
    inner = "--data.init_args.datamodule.init_args"
    args = [
        "train",
        "-c",
        str(CONFIGS / "mvtec_confetti.yaml"),
        f"{inner}.root={tmp_path / 'data'}",
        f"{inner}.category=brick",
        f"{inner}.num_workers=0",
        "--model.pre_trained=false",
        "--model.layers=[blocks.2]",
        "--model.settings.hidden_dim=32",
        "--model.settings.num_encoder_layers=1",
        "--model.settings.num_decoder_layers=1",
        "--model.settings.num_heads=4",
        "--model.settings.ffn_dim=64",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--default_root_dir={tmp_path / 'results'}",
    ]
    cli = AnomalibCLI(args)
    assert cli.engine.trainer.global_step == 1
    assert not cli.model.feature_cache.enabled  # confetti on the fly: no feature cache
    assert "pixel_AUROC" in cli.engine.trainer.callback_metrics
    assert list((tmp_path / "results").rglob("*.ckpt"))
