"""Untrusted files: a checkpoint with a malicious pickle payload is refused by every way our
files are loaded, and its code never runs. The payload would create a marker file; the control test shows
that it does when a file is unpickled without ``weights_only``."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
from anomalib.deploy import ExportType, TorchInferencer

from adtr_anomalib import ADTR, ADTRModel, ADTRPlus
from adtr_anomalib.data import mvtec_layout_folder
from tests.conftest import TINY
from tests.helpers import make_folder, tiny_adtr, tiny_engine


class Payload:
    """Unpickling this object calls ``Path(marker).touch()``: a stand-in for any code an attacker chooses."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return Path.touch, (self.marker,)


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    """A real ADTR checkpoint (weights, hyper-parameters) plus one poisoned entry; returns (file, marker)."""
    marker = tmp_path / "payload_ran"
    model = tiny_adtr(pre_trained=False)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "model": Payload(marker),
    }
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_payload_runs_when_unpickled_without_weights_only(malicious: tuple[Path, Path]) -> None:
    """Control: the file really is dangerous, so the refusals below mean something."""
    path, marker = malicious
    torch.load(path, weights_only=False)
    assert marker.exists()


def _load_from_checkpoint(path: Path, tmp_path: Path) -> None:
    ADTR.load_from_checkpoint(path)


def _engine_fit_resume(path: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    tiny_engine(tmp_path / "results").fit(
        tiny_adtr(pre_trained=False), datamodule=mvtec_layout_folder(root), ckpt_path=path
    )


def _engine_test(path: Path, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "part")
    tiny_engine(tmp_path / "results").test(
        tiny_adtr(pre_trained=False), datamodule=mvtec_layout_folder(root), ckpt_path=path
    )


def _engine_export(path: Path, tmp_path: Path) -> None:
    tiny_engine(tmp_path / "results").export(tiny_adtr(pre_trained=False), ExportType.ONNX, ckpt_path=path)


def _adtr_plus_start(path: Path, tmp_path: Path) -> None:
    ADTRPlus(backbone="tf_efficientnet_lite0", pre_trained=False, **TINY).load_adtr_checkpoint(path)


def _backbone_weights(path: Path, tmp_path: Path) -> None:
    ADTRModel("tf_efficientnet_lite0", ["blocks.1"], weights=path, input_size=(32, 32), **TINY)


@pytest.mark.parametrize(
    "load",
    [_load_from_checkpoint, _engine_fit_resume, _engine_test, _engine_export, _adtr_plus_start, _backbone_weights],
    ids=[
        "ADTR.load_from_checkpoint",
        "Engine.fit(ckpt_path) resume",
        "Engine.test(ckpt_path)",
        "Engine.export(ckpt_path)",
        "ADTRPlus adtr_checkpoint",
        "backbone weights file",
    ],
)
def test_malicious_checkpoint_is_refused_and_never_executed(
    malicious: tuple[Path, Path], tmp_path: Path, load: Callable[[Path, Path], None]
) -> None:
    path, marker = malicious
    refused = "Unsupported global"  # torch (or timm's reader, on torch's behalf) refuses the payload's function
    with pytest.raises((pickle.UnpicklingError, ValueError), match=refused):
        load(path, tmp_path)
    assert not marker.exists()


def test_torch_export_needs_explicit_trust(malicious: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`anomalib export --export_type torch` writes a pickle: TorchInferencer refuses it without TRUST_REMOTE_CODE=1."""
    path, marker = malicious
    exported = path.with_name("model.pt")
    path.rename(exported)
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ValueError, match="TRUST_REMOTE_CODE=1"):
        TorchInferencer(exported, device="cpu")
    assert not marker.exists()
