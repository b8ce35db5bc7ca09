"""anomalib's TensorBoard and MLflow loggers record ADTR's training loss, test metrics and images (offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from anomalib.loggers import AnomalibMLFlowLogger, AnomalibTensorBoardLogger
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.metrics import inspection_evaluator
from adtr_anomalib.visualization import LoggingImageVisualizer
from tests.helpers import tiny_adtr, tiny_engine

TEST_METRICS = ("image_AUROC", "pixel_AUROC")


@pytest.fixture(scope="module")
def logged_run(tiny_textures_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny fit + test with both loggers attached, as `--logger` would attach them."""
    out = tmp_path_factory.mktemp("loggers")
    # A local file store, as the issue asks; MLflow 3 keeps it behind this switch (its default is a database).
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    tensorboard = AnomalibTensorBoardLogger(save_dir=str(out / "tensorboard"), name="adtr")
    mlflow = AnomalibMLFlowLogger(experiment_name="adtr", tracking_uri=(out / "mlruns").as_uri())
    model = tiny_adtr(evaluator=inspection_evaluator(), visualizer=True)
    engine = tiny_engine(out / "run", max_epochs=2, logger=[tensorboard, mlflow], log_every_n_steps=1)
    datamodule = mvtec_layout_folder(tiny_textures_root, train_batch_size=4, eval_batch_size=4, seed=0)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    tensorboard.experiment.flush()
    return {"tensorboard": tensorboard, "mlflow": mlflow, "results": results, "model": model}


def test_default_visualizer_feeds_image_loggers(logged_run: dict) -> None:
    assert isinstance(logged_run["model"].visualizer, LoggingImageVisualizer)


def test_tensorboard_records_loss_metrics_and_images(logged_run: dict, tiny_textures_root: Path) -> None:
    events = EventAccumulator(logged_run["tensorboard"].log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    losses = [event.value for event in events.Scalars("train_loss")]
    assert len(losses) == 2, losses  # one per epoch
    for name in TEST_METRICS:
        assert name in scalars, scalars
        assert events.Scalars(name)[-1].value == pytest.approx(logged_run["results"][name], abs=1e-6)
    test_images = sorted(p.parent.name + "_" + p.name for p in (tiny_textures_root / "test").rglob("*.png"))
    assert sorted(events.Tags()["images"]) == test_images
    image = events.Images(test_images[0])[0]
    assert image.width > 0
    assert image.encoded_image_string.startswith(b"\x89PNG")


def test_mlflow_records_loss_metrics_and_images(logged_run: dict, tiny_textures_root: Path) -> None:
    mlflow: AnomalibMLFlowLogger = logged_run["mlflow"]
    client = MlflowClient(tracking_uri=mlflow._tracking_uri)  # the logger keeps no public copy
    run = client.get_run(mlflow.run_id)
    history = client.get_metric_history(mlflow.run_id, "train_loss")
    assert len(history) == 2, history
    for name in TEST_METRICS:
        assert run.data.metrics[name] == pytest.approx(logged_run["results"][name], abs=1e-6)
    assert run.data.params["backbone"] == "tf_efficientnet_lite0"  # hyper-parameters are logged too
    artifacts = sorted(a.path for a in client.list_artifacts(mlflow.run_id))
    test_images = sorted(p.parent.name + "_" + p.name for p in (tiny_textures_root / "test").rglob("*.png"))
    assert artifacts == test_images
