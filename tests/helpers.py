"""Small helpers shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine
from PIL import Image
from sklearn.metrics import roc_auc_score

from adtr_anomalib import ADTR
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.conftest import TINY


def small_adtr(image_size: int = 128, model_class: type = ADTR, **kwargs: object) -> ADTR:
    """Lite0 ADTR (or ADTR+, via ``model_class``) with a small transformer, for fast tests."""
    options = {
        "backbone": "tf_efficientnet_lite0",
        **TINY,
        "hidden_dim": 64,  # the tiny transformer at twice the width: enough to learn the textures' normal features
        "ffn_dim": 128,
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "visualizer": False,
        "pre_processor": ADTR.configure_pre_processor((image_size, image_size), backbone="tf_efficientnet_lite0"),
    }
    options.update(kwargs)
    return model_class(**options)


def fit(model: ADTR, root: Path, epochs: int, out: Path, **engine_kwargs: object) -> Engine:
    """Train with anomalib's Engine on an MVTec-layout folder."""
    datamodule = mvtec_layout_folder(root, train_batch_size=8, eval_batch_size=8, seed=0)
    engine = Engine(max_epochs=epochs, default_root_dir=out, logger=False, **engine_kwargs)
    engine.fit(model=model, datamodule=datamodule)
    return engine


@torch.no_grad()
def raw_aurocs(model: ADTR, root: Path) -> tuple[float, float]:
    """Image and pixel AUROC from the model's raw scores (rank-based, so no normalisation is needed)."""
    datamodule = mvtec_layout_folder(root, eval_batch_size=8)
    datamodule.setup()
    model.eval()
    scores, labels, maps, masks = [], [], [], []
    for batch in datamodule.test_dataloader():
        out = model.model(model.pre_processor(batch.image))
        scores.append(out.pred_score)
        labels.append(batch.gt_label)
        size = out.anomaly_map.shape[-2:]
        gt = torch.nn.functional.interpolate(batch.gt_mask[:, None].float(), size=size, mode="nearest")
        maps.append(out.anomaly_map.flatten())
        masks.append(gt.flatten() > 0.5)
    image = roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())
    pixel = roc_auc_score(torch.cat(masks).numpy(), torch.cat(maps).numpy())
    return float(image), float(pixel)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].cpu().numpy(), b[k].cpu().numpy()) for k in a)


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write ``array`` as an image file (format from the suffix), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def make_folder(root: Path, n_train: int = 8, n_test: int = 2, size: int = 32, masks: bool = True) -> Path:
    """A tiny MVTec-layout folder of noise images; defect images carry a bright square, masks are 0/255 PNGs."""
    rng = np.random.default_rng(0)

    def noise() -> np.ndarray:
        return rng.integers(0, 200, (size, size, 3), dtype=np.uint8)

    for i in range(n_train):
        save_image(root / "train" / "good" / f"{i:03d}.png", noise())
    for i in range(n_test):
        save_image(root / "test" / "good" / f"{i:03d}.png", noise())
        defect, mask = noise(), np.zeros((size, size), np.uint8)
        defect[size // 4 : size // 2, size // 4 : size // 2] = mask[size // 4 : size // 2, size // 4 : size // 2] = 255
        save_image(root / "test" / "defect" / f"{i:03d}.png", defect)
        if masks:
            save_image(root / "ground_truth" / "defect" / f"{i:03d}_mask.png", mask)
    return root


def tiny_adtr(**kwargs: object) -> ADTR:
    """32-px ADTR on two Lite0 stages with a one-layer 32-wide transformer: a training step takes milliseconds."""
    options = {
        "layers": ["blocks.1", "blocks.2"],
        "feature_stride": 8,
        "pooling_kernel": 8,
        "hidden_dim": 32,
        "ffn_dim": 64,
        "evaluator": False,
    }
    return small_adtr(image_size=32, **{**options, **kwargs})


def tiny_engine(out: Path, **kwargs: object) -> Engine:
    """A quiet CPU Engine writing under ``out``."""
    options = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return Engine(default_root_dir=out, enable_model_summary=False, **{**options, **kwargs})


def tiny_torch_model(size: int = 32, **kwargs: object) -> ADTRModel:
    """Random-weight Lite0 ``ADTRModel`` on two stages with the one-layer transformer, in eval mode."""
    options = {"layers": ("blocks.1", "blocks.2"), "feature_stride": 8, "pooling_kernel": 8, **TINY, **kwargs}
    return ADTRModel("tf_efficientnet_lite0", pre_trained=False, input_size=(size, size), **options).eval()


def onnx_outputs(model: ADTR, export_root: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Export ``model`` with anomalib's ``to_onnx`` and run ``images`` through ONNX Runtime: outputs by name."""
    import onnxruntime  # here, not at the top: only the export tests need it

    session = onnxruntime.InferenceSession(str(model.to_onnx(export_root)), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
