"""One ADTR then ADTR+ fit and test through anomalib's Engine, on 1 or 2 CPU processes (DDP over gloo).

Run by ``tests/test_distributed.py`` as ``python -m tests.ddp_worker``: Lightning's DDP launcher starts the other
ranks by running the same command again, which a pytest process cannot do. Every rank writes
``rank<r>.json`` under ``--out`` with what it saw (statistics, its feature cache checked against fresh
features, the anomalies moved into training); rank 0 also writes the test metrics.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.data import ConfettiNoise, WithAnomalies, mvtec_layout_folder
from adtr_anomalib.metrics import inspection_evaluator
from tests.helpers import small_adtr

OPTIONS = {"feature_stride": 8, "lr": 2e-3, "normalize_features": True, "normalize_map": True}
EPOCHS = 4
GLOBAL_BATCH = 8  # split over the processes, so one and two processes take the same optimiser steps


class CacheCheck(Callback):
    """At the end of the last epoch, compare every cached feature map with the features of the image read anew."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 < trainer.max_epochs:
            return
        cache = pl_module.feature_cache.features  # what is checked is exactly this store
        dataset = trainer.datamodule.train_data
        index = {str(path): i for i, path in enumerate(dataset.samples["image_path"])}
        worst = 0.0
        with torch.no_grad():
            for path, cached in cache.items():
                image = pl_module.pre_processor(dataset[index[str(path)]].image[None])
                fresh = pl_module.model.extract_features(image)[0]
                worst = max(worst, float((fresh - cached).abs().max()))
        self.report = {"cached": sorted(str(p) for p in cache), "cache_max_difference": worst}


def engine(out: Path, devices: int, callbacks: list[Callback]) -> Engine:
    strategy = "ddp" if devices > 1 else "auto"
    return Engine(
        default_root_dir=out, max_epochs=EPOCHS, accelerator="cpu", devices=devices, strategy=strategy,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(args.seed)
    batch = GLOBAL_BATCH // args.devices

    check = CacheCheck()
    adtr_engine = engine(args.out / "adtr", args.devices, [check])
    model = small_adtr(evaluator=inspection_evaluator(), **OPTIONS)
    data = mvtec_layout_folder(args.root, train_batch_size=batch, eval_batch_size=batch, seed=0)
    adtr_engine.fit(model=model, datamodule=data)
    adtr_metrics = adtr_engine.test(model=model, datamodule=data)[0]
    checkpoint = adtr_engine.trainer.checkpoint_callback.best_model_path

    plus_data = WithAnomalies(
        mvtec_layout_folder(args.root, train_batch_size=batch, eval_batch_size=batch, seed=0),
        move_from_test=1,
        synthetic_anomalies=ConfettiNoise(probability=0.5),
    )
    plus = small_adtr(model_class=ADTRPlus, adtr_checkpoint=checkpoint, evaluator=inspection_evaluator(), **OPTIONS)
    # Both ranks are running by now, so both would create anomalib's next versioned results folder at once (Engine.fit,
    # create_versioned_dir) and one can fail with FileExistsError; each rank keeps its own folder, as rank 1 already
    # does for the first fit (it starts after rank 0 made its folder). Lightning broadcasts rank 0's checkpoint folder.
    plus_engine = engine(args.out / "plus" / f"rank{os.environ.get('LOCAL_RANK', '0')}", args.devices, [])
    plus_engine.fit(model=plus, datamodule=plus_data)
    plus_metrics = plus_engine.test(model=plus, datamodule=plus_data)[0]

    rank = adtr_engine.trainer.global_rank
    report = {
        "world_size": adtr_engine.trainer.world_size,
        "feature_mean": model.model.feature_mean.tolist(),
        "map_mean_sum": float(model.model.map_mean.double().sum()),
        "plus_map_mean_sum": float(plus.model.map_mean.double().sum()),
        "moved": sorted(str(p) for p in plus_data.moved_anomalies["image_path"]),
        **check.report,
    }
    if rank == 0:
        report["metrics"] = {"ADTR": adtr_metrics, "ADTRPlus": plus_metrics}
        report["adtr_type"] = type(model).__name__ == ADTR.__name__
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    # Every rank's own failure, where the test can read it: the ranks share one output stream, whose tail the test
    # shows, so a rank that fails first is otherwise hidden behind the other rank's "connection closed" error.
    faulthandler.enable()  # a crash in native code prints its Python stack
    try:
        main()
    except BaseException:
        out = Path(sys.argv[sys.argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{os.environ.get('LOCAL_RANK', '0')}.error").write_text(traceback.format_exc())
        raise
