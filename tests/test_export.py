"""Deployment: `anomalib export` of ADTR and ADTR+ (torch, ONNX, OpenVINO with FP16/INT8), parity between the
runtimes, `anomalib predict`, and anomalib's inferencers.

Outputs are post-processed (scores and maps min-max normalised to [0, 1], threshold 0.5). Tolerances, against
the torch model on the same images:

* ONNX Runtime, and OpenVINO FP32 run at f32 inference precision: ``FP32_TOL`` on ``pred_score`` and
  ``anomaly_map``; ``pred_label`` identical.
* OpenVINO at reduced precision — the FP16 IR, bf16 execution (OpenVINO's default on CPUs with AVX-512 BF16 or
  AMX) and INT8 weight compression: ``REDUCED_TOL``; labels identical for images scored more than
  ``REDUCED_TOL`` from the threshold.
* INT8 post-training quantisation (weights and activations, calibrated on training images): ``PTQ_TOL``,
  labels likewise.

The exported graph has a symbolic batch and symbolic height/width: the pre-processor's resize is part of it,
so any image size goes in and the anomaly map comes out at the training size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import openvino
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import ConfettiNoise, WithAnomalies, mvtec_layout_folder
from adtr_anomalib.deploy import PARITY_TOLERANCES, openvino_config
from tests.helpers import small_adtr

# Trains through anomalib's CLI and exports to ONNX and OpenVINO: minutes.
pytestmark = pytest.mark.slow

SIZE = 64
FP32_TOL, REDUCED_TOL, PTQ_TOL = (PARITY_TOLERANCES[key] for key in ("fp32", "reduced", "int8_ptq"))
OUTPUTS = ("pred_score", "anomaly_map")
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))


def _engine(root: Path) -> Engine:
    return Engine(default_root_dir=root, max_epochs=1, logger=False, enable_progress_bar=False)


@pytest.fixture(scope="module")
def checkpoints(textures_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An ADTR checkpoint (ImageNet Lite0, one epoch) and an ADTR+ checkpoint continued from it with confetti."""
    seed_everything(0)  # the same models whichever tests ran before (module fixtures run before `_seed`)
    out = tmp_path_factory.mktemp("trained")
    datamodule = mvtec_layout_folder(textures_root, train_batch_size=8, eval_batch_size=8, seed=0)
    engine = _engine(out / "adtr")
    engine.fit(small_adtr(SIZE), datamodule=datamodule)
    adtr = Path(engine.trainer.checkpoint_callback.best_model_path)
    plus_data = WithAnomalies(
        mvtec_layout_folder(textures_root, train_batch_size=8, eval_batch_size=8, seed=0),
        synthetic_anomalies=ConfettiNoise(probability=0.5),
    )
    engine = _engine(out / "plus")
    engine.fit(small_adtr(SIZE, ADTRPlus, adtr_checkpoint=str(adtr)), datamodule=plus_data)
    return {"ADTR": adtr, "ADTRPlus": Path(engine.trainer.checkpoint_callback.best_model_path)}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real `anomalib` console script, offline: any download attempt fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([ANOMALIB, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"anomalib {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`anomalib export` through the CLI: ADTR to OpenVINO, ADTR+ to ONNX and to torch."""
    out = tmp_path_factory.mktemp("exports")
    jobs = {
        "ADTR-openvino": ("ADTR", "openvino"),
        "ADTRPlus-onnx": ("ADTRPlus", "onnx"),
        "ADTRPlus-torch": ("ADTRPlus", "torch"),
    }
    files = {}
    for name, (model, export_type) in jobs.items():
        root = out / name
        _cli("export", "--model", model, "--export_type", export_type, "--ckpt_path", str(checkpoints[model]),
             "--export_root", str(root), cwd=out)  # fmt: skip
        suffix = {"openvino": "xml", "onnx": "onnx", "torch": "pt"}[export_type]
        (files[name],) = (root / "weights" / export_type).glob(f"*.{suffix}")
    return files


@pytest.fixture(scope="module")
def images(textures_root: Path) -> torch.Tensor:
    """Real test images (good and defective), as anomalib's inferencers read them: RGB in [0, 1]."""
    paths = sorted((textures_root / "test").rglob("*.png"))
    good = [p for p in paths if p.parent.name == "good"][:3]
    bad = [p for p in paths if p.parent.name != "good"][:3]
    return torch.stack([read_image(p, as_tensor=True) for p in good + bad])


def _load(checkpoints: dict[str, Path], name: str) -> ADTR | ADTRPlus:
    cls = {"ADTR": ADTR, "ADTRPlus": ADTRPlus}[name]
    return cls.load_from_checkpoint(checkpoints[name], weights_only=True).eval()


@torch.no_grad()
def _torch_outputs(model: ADTR | ADTRPlus, images: torch.Tensor) -> dict[str, np.ndarray]:
    result = model(images)
    return {name: getattr(result, name).numpy() for name in (*OUTPUTS, "pred_label")}


def _assert_parity(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: float, what: str) -> None:
    for name in OUTPUTS:
        assert actual[name].shape == expected[name].shape, f"{what}: {name} shape"
        error = float(np.abs(actual[name].astype(np.float32) - expected[name]).max())
        assert error <= tol, f"{what}: {name} differs by {error:.2e} (tolerance {tol})"
    decisive = np.abs(expected["pred_score"] - 0.5) > tol  # labels of scores at the threshold may flip
    assert decisive.any(), f"{what}: every score is within {tol} of the threshold; the label check is void"
    np.testing.assert_array_equal(
        actual["pred_label"].astype(bool)[decisive], expected["pred_label"][decisive], err_msg=what
    )


def _openvino_outputs(xml: Path, images: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    compiled = openvino.Core().compile_model(str(xml), "CPU", openvino_config(precision))
    result = compiled(images.numpy())
    return {output.get_any_name(): result[output] for output in compiled.outputs}


# --- export through the CLI -----------------------------------------------------------------------------------


def test_cli_exports_are_offline_and_batch_symbolic(exported: dict[str, Path]) -> None:
    graph = onnx.load(str(exported["ADTRPlus-onnx"])).graph
    (tensor,) = graph.input
    dims = tensor.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch_size", 3, "height", "width"]
    assert {o.name for o in graph.output} >= {"pred_score", "pred_label", "anomaly_map"}
    shape = openvino.Core().read_model(str(exported["ADTR-openvino"])).inputs[0].partial_shape
    assert shape[0].is_dynamic
    assert shape[2].is_dynamic
    assert shape[3].is_dynamic
    assert exported["ADTR-openvino"].with_suffix(".bin").stat().st_size > 1_000_000
    assert exported["ADTRPlus-torch"].stat().st_size > 1_000_000


def test_onnx_runtime_matches_torch_at_any_batch_and_image_size(
    exported: dict[str, Path], checkpoints: dict[str, Path], images: torch.Tensor
) -> None:
    model = _load(checkpoints, "ADTRPlus")
    session = onnxruntime.InferenceSession(str(exported["ADTRPlus-onnx"]), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    resized = torch.nn.functional.interpolate(images, size=(96, 160), mode="bilinear", antialias=True)
    for batch in (images[:1], images, resized):
        actual = dict(zip(names, session.run(None, {"input": batch.numpy()}), strict=True))
        expected = _torch_outputs(model, batch)
        assert actual["anomaly_map"].shape[-2:] == (SIZE, SIZE)
        _assert_parity(actual, expected, FP32_TOL, f"ONNX Runtime, input {tuple(batch.shape)}")


def test_openvino_fp32_matches_torch_and_reduced_precision_stays_close(
    exported: dict[str, Path], checkpoints: dict[str, Path], images: torch.Tensor
) -> None:
    expected = _torch_outputs(_load(checkpoints, "ADTR"), images)
    xml = exported["ADTR-openvino"]
    _assert_parity(_openvino_outputs(xml, images, "f32"), expected, FP32_TOL, "OpenVINO FP32")
    _assert_parity(_openvino_outputs(xml, images, "bf16"), expected, REDUCED_TOL, "OpenVINO bf16 execution")


@pytest.mark.parametrize(
    ("compression", "tol"),
    [(CompressionType.FP16, REDUCED_TOL), (CompressionType.INT8, REDUCED_TOL), (CompressionType.INT8_PTQ, PTQ_TOL)],
)
def test_openvino_compression_stays_within_its_tolerance(
    compression: CompressionType,
    tol: float,
    checkpoints: dict[str, Path],
    exported: dict[str, Path],
    textures_root: Path,
    images: torch.Tensor,
    tmp_path: Path,
) -> None:
    model = _load(checkpoints, "ADTR")
    expected = _torch_outputs(model, images)
    calibration = mvtec_layout_folder(textures_root, train_batch_size=8, eval_batch_size=8, seed=0)
    xml = Engine(default_root_dir=tmp_path, logger=False).export(
        model=model,
        export_type="openvino",
        export_root=tmp_path,
        compression_type=compression,
        datamodule=calibration if compression == CompressionType.INT8_PTQ else None,
    )
    fp32_size = exported["ADTR-openvino"].with_suffix(".bin").stat().st_size
    assert xml.with_suffix(".bin").stat().st_size < 0.6 * fp32_size  # compressed: half (FP16) or less (INT8)
    _assert_parity(_openvino_outputs(xml, images, "f32"), expected, tol, f"OpenVINO {compression.value}")


# --- inference --------------------------------------------------------------------------------------------------


def test_openvino_inferencer_runs_batch_one_and_n(
    exported: dict[str, Path], checkpoints: dict[str, Path], images: torch.Tensor, textures_root: Path
) -> None:
    expected = _torch_outputs(_load(checkpoints, "ADTR"), images)
    inferencer = OpenVINOInferencer(exported["ADTR-openvino"], device="CPU", config=openvino_config("f32"))
    batch = inferencer.predict(images)
    actual = {name: np.asarray(getattr(batch, name)) for name in (*OUTPUTS, "pred_label")}
    _assert_parity(actual, expected, FP32_TOL, "OpenVINOInferencer, batch N")
    single = inferencer.predict(images[3])
    assert np.asarray(single.pred_score).shape == (1,)
    assert float(np.asarray(single.pred_score)[0]) == pytest.approx(float(expected["pred_score"][3]), abs=FP32_TOL)
    from_file = inferencer.predict(next((textures_root / "test" / "good").glob("*.png")))
    assert np.asarray(from_file.anomaly_map).shape[-2:] == (SIZE, SIZE)


def test_torch_inferencer_runs_batch_one_and_n_without_gradients(
    exported: dict[str, Path], checkpoints: dict[str, Path], images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's torch export is a pickle: the user must opt in
    inferencer = TorchInferencer(exported["ADTRPlus-torch"], device="cpu")
    assert not any(parameter.requires_grad for parameter in inferencer.model.parameters())
    expected = _torch_outputs(_load(checkpoints, "ADTRPlus"), images)
    for batch, rows in ((images, slice(None)), (images[:1], slice(0, 1))):
        result = inferencer.predict(batch)
        assert not result.anomaly_map.requires_grad
        assert result.anomaly_map.grad_fn is None
        reference = {name: value[rows] for name, value in expected.items()}
        # TorchInferencer drops the anomaly map's channel axis.
        actual = {name: getattr(result, name).numpy().reshape(reference[name].shape) for name in reference}
        _assert_parity(actual, reference, FP32_TOL, f"TorchInferencer, batch {len(batch)}")


def test_anomalib_predict_writes_visualised_results(
    checkpoints: dict[str, Path], textures_root: Path, tmp_path: Path
) -> None:
    folder = textures_root / "test" / "good"
    count = len(list(folder.glob("*.png")))
    _cli("predict", "--model", "ADTR", "--ckpt_path", str(checkpoints["ADTR"]), "--data", str(folder),
         "--default_root_dir", str(tmp_path / "results"), cwd=tmp_path)  # fmt: skip
    written = [p for p in (tmp_path / "results").rglob("*.png")]
    assert len(written) == count, f"expected {count} visualised images, found {[str(p) for p in written]}"
