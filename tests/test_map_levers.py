"""Levers on the anomaly map: patch tokens (a stride-8 map from stride-16 attention) and ``map_layers``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adtr_anomalib import ADTR
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.anomaly_map import AnomalyMapGenerator
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.helpers import make_folder, tiny_adtr, tiny_engine, tiny_torch_model


def _model(patch_size: int) -> ADTRModel:
    return tiny_torch_model(64, patch_size=patch_size)


def test_patch_tokens_reconstruct_every_position_of_the_fine_grid() -> None:
    model = _model(patch_size=2)
    features = model.extract_features(torch.rand(3, 3, 64, 64))
    assert features.shape[-2:] == (8, 8)
    assert model.reconstructor.pos_embed.shape[1] == 16  # one token per 2x2 block of the 8x8 grid
    reconstruction = model.reconstruct(features)
    assert reconstruction.shape == features.shape
    distance = AnomalyMapGenerator.compute_distance(features, reconstruction)[:, 0]
    # The map lives on the 8x8 grid: the four positions of a token's block get their own values, which a
    # per-token map up-sampled from 4x4 would not.
    blocks = distance.reshape(3, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(3, 16, 4)
    assert (blocks.std(dim=-1) > 1e-4 * blocks.mean(dim=-1)).all()


def test_patch_size_must_divide_the_feature_grid() -> None:
    with pytest.raises(ValueError, match=r"patch_size \(2\) must .* divide the feature grid 9x8"):
        ADTRModel("tf_efficientnet_lite0", pre_trained=False, input_size=(72, 64), feature_stride=8, patch_size=2)
    with pytest.raises(ValueError, match=r"patch_size \(0\)"):
        ADTRModel("tf_efficientnet_lite0", pre_trained=False, input_size=(64, 64), patch_size=0)


def test_patch_tokens_train_and_reload_from_their_checkpoint(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False, patch_size=2)
    engine = tiny_engine(tmp_path / "results")
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0))
    restored = ADTR.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path).eval()
    assert restored.model.reconstructor.patch_size == 2
    images = torch.rand(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(restored.model(images).anomaly_map, model.model(images).anomaly_map)


def test_map_layers_map_sums_only_their_channels_and_the_image_score_stays() -> None:
    torch.manual_seed(0)
    everything = tiny_torch_model()
    shallow = tiny_torch_model(map_layers=["blocks.1"])
    shallow.load_state_dict(everything.state_dict())  # the same network: only the map's channels differ
    images = torch.rand(2, 3, 32, 32)
    full, subset = everything(images), shallow(images)
    torch.testing.assert_close(subset.pred_score, full.pred_score)
    assert not torch.allclose(subset.anomaly_map, full.anomaly_map)
    features = everything.extract_features(images)
    first_stage = everything.feature_extractor.out_dims[0]
    expected = AnomalyMapGenerator().compute_anomaly_map(
        features[:, :first_stage], everything.reconstruct(features)[:, :first_stage], (32, 32)
    )
    torch.testing.assert_close(subset.anomaly_map, expected)


def test_map_layers_must_be_some_of_the_layers() -> None:
    with pytest.raises(ValueError, match=r"map_layers must be a non-empty subset of layers .*\['blocks.4'\]"):
        tiny_torch_model(map_layers=["blocks.4"])
    with pytest.raises(ValueError, match="map_layers must be a non-empty subset"):
        tiny_torch_model(map_layers=[])


def test_map_layers_come_back_with_the_checkpoint(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part", n_train=4)
    model = tiny_adtr(pre_trained=False, map_layers=["blocks.1"])
    engine = tiny_engine(tmp_path / "results")
    engine.fit(model=model, datamodule=mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0))
    restored = ADTR.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path).eval()
    assert restored.model.map_layers == ["blocks.1"]
    assert not restored.model.map_is_all
