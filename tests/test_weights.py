"""Backbone weights: offline Lite0 package, local files, and a clear error when nothing is available."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata
from torch.nn import functional as F  # noqa: N812

from adtr_anomalib.models.adtr.components.backbone import (
    convert_efficientnet_pytorch_state_dict,
    load_backbone_weights,
    offline_weights_file,
)
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.conftest import TINY

# ImageNet classes: 281-285 are domestic cats; 967 espresso, 968 cup, 504 coffee mug.
CAT_CLASSES = {281, 282, 283, 284, 285}
COFFEE_CLASSES = {967, 968, 504}


def _lite0_classifier(converted: bool) -> torch.nn.Module:
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    if converted:
        path = offline_weights_file("tf_efficientnet_lite0")
        state = torch.load(path, weights_only=True)
        stages = [len(stage) for stage in network.blocks]
        network.load_state_dict(convert_efficientnet_pytorch_state_dict(state, stages), strict=True)
    return network


def _top5(network: torch.nn.Module, photo: np.ndarray) -> set[int]:
    image = torch.from_numpy(photo).permute(2, 0, 1).float().div(255).unsqueeze(0)
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = network((image - 0.5) / 0.5)
    return set(logits.topk(5).indices[0].tolist())


def test_packaged_lite0_weights_map_strictly_and_recognise_photos() -> None:
    # strict=True inside _lite0_classifier: every tensor of timm's network is filled, none left over.
    network = _lite0_classifier(converted=True)
    assert _top5(network, skdata.chelsea()) & CAT_CLASSES
    assert _top5(network, skdata.coffee()) & COFFEE_CLASSES


def test_random_weights_do_not_recognise_photos() -> None:
    network = _lite0_classifier(converted=False)
    assert not (_top5(network, skdata.chelsea()) & CAT_CLASSES and _top5(network, skdata.coffee()) & COFFEE_CLASSES)


def test_lite0_backbone_loads_offline_by_name() -> None:
    model = ADTRModel("tf_efficientnet_lite0", pre_trained=True, input_size=(64, 64), **TINY)
    assert bool(model.backbone_weights_loaded)
    packaged = torch.load(offline_weights_file("tf_efficientnet_lite0"), weights_only=True)
    loaded = model.feature_extractor.feature_extractor.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], packaged["_conv_stem.weight"])


def test_local_weights_file_is_used(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", pretrained=False, features_only=True)
    with torch.no_grad():
        source.conv1.weight.fill_(0.25)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = ADTRModel("resnet18", ["layer2", "layer3"], weights=path, input_size=(64, 64), **TINY)
    assert torch.all(model.feature_extractor.feature_extractor.conv1.weight == 0.25)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*`weights`"):
        ADTRModel("resnet18", ["layer2"], weights=tmp_path / "nowhere.pth", input_size=(64, 64), **TINY)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", features_only=True).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit backbone 'resnet18'"):
        ADTRModel("resnet18", ["layer2"], weights=path, input_size=(64, 64), **TINY)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(timm.create_model("resnet18", features_only=True), path)  # a whole pickled module, not tensors
    with pytest.raises(ValueError, match=r"pickled model objects are refused") as error:
        ADTRModel("resnet18", ["layer2"], weights=path, input_size=(64, 64), **TINY)
    assert "weights_only=False" not in str(error.value)  # no advice to run the file's code


def test_no_weight_source_names_the_options_and_fails_fast() -> None:
    extractor = timm.create_model("resnet18", pretrained=False, features_only=True)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as error:
        load_backbone_weights(extractor, "resnet18")  # HF_HUB_OFFLINE=1 (conftest): no hub here
    message = str(error.value)
    assert "weights=PATH" in message
    assert "tf_efficientnet_lite0" in message
    assert "internet" in message
    assert time.perf_counter() - start < 30


def test_tagged_timm_names_are_accepted_as_backbones() -> None:
    # timm.is_model accepts a pretrained tag; timm.list_models() lists untagged names only.
    model = ADTRModel("resnet18.a1_in1k", ["layer2", "layer3"], pre_trained=False, input_size=(64, 64), **TINY)
    assert model.extract_features(torch.zeros(1, 3, 64, 64)).shape[1] == 128 + 256
    with pytest.raises(ValueError, match=r"Unknown backbone 'resnet18\.no_such_tag'"):
        ADTRModel("resnet18.no_such_tag", ["layer2"], pre_trained=False, input_size=(64, 64), **TINY)


@pytest.mark.parametrize("form", ["wrapped", "safetensors"])
def test_weights_file_in_a_checkpoint_wrapper_or_safetensors_is_read(tmp_path: Path, form: str) -> None:
    source = timm.create_model("resnet18", pretrained=False, features_only=True)
    with torch.no_grad():
        source.conv1.weight.fill_(0.5)
    if form == "wrapped":
        path = tmp_path / "checkpoint.pth"
        torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = ADTRModel("resnet18", ["layer2", "layer3"], weights=path, input_size=(64, 64), **TINY)
    assert torch.all(model.feature_extractor.feature_extractor.conv1.weight == 0.5)
