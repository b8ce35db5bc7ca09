"""Interrupted and repeated runs: a run resumed from its last checkpoint ends with the same
weights as an uninterrupted one, results folders are versioned and never overwritten, and two runs with the
same seed give the same scores. CPU, default settings (bf16 autocast and the feature cache on)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import seed_everything

from adtr_anomalib import ADTR
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.torch_model import ADTRModel
from tests.helpers import make_folder, state_equal, tiny_adtr, tiny_engine

EPOCHS = 3  # 2 steps per epoch; the interrupted run stops at the start of epoch 1


class PowerCut(pl.Callback):
    """Kill the run at the start of ``epoch``, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        del pl_module
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("power cut")


def _train(root: Path, out: Path, seed: int, **fit_kwargs: object) -> tuple[ADTR, Path]:
    """Seed, build and fit a tiny ADTR (Lite0 ImageNet weights); return it and its results version folder."""
    callbacks = fit_kwargs.pop("callbacks", [])
    seed_everything(seed)
    model = tiny_adtr()
    engine = tiny_engine(out, max_epochs=EPOCHS, callbacks=callbacks)
    datamodule = mvtec_layout_folder(root, train_batch_size=4, eval_batch_size=4, seed=0)
    try:
        engine.fit(model, datamodule=datamodule, **fit_kwargs)
    finally:
        version = Path(engine.trainer.default_root_dir)
    return model, version


def _scores(model: ADTR, root: Path) -> torch.Tensor:
    datamodule = mvtec_layout_folder(root, eval_batch_size=4)
    datamodule.setup()
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model.model(model.pre_processor.transform(b.image)).pred_score for b in datamodule.test_dataloader()]
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    root = make_folder(tmp / "part")
    out = tmp / "results"
    loads: list[int] = []  # calls of ADTRModel.load_backbone_weights, counted per run below
    load = ADTRModel.load_backbone_weights

    def counted(model: ADTRModel, *args: object, **kwargs: object) -> str:
        loads[-1] += 1
        return load(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ADTRModel, "load_backbone_weights", counted)
        loads.append(0)
        first, first_dir = _train(root, out, seed=0)
        first_checkpoint = first_dir / "weights" / "lightning" / "model.ckpt"
        snapshot = first_checkpoint.read_bytes()
        loads.append(0)
        with pytest.raises(RuntimeError, match="power cut"):
            _train(root, out, seed=0, callbacks=[PowerCut(1)])
        interrupted_dir = sorted((out / "ADTR" / "part").glob("v*"))[-1]
        interrupted_checkpoint = interrupted_dir / "weights" / "lightning" / "model.ckpt"
        interrupted_snapshot = interrupted_checkpoint.read_bytes()
        # A different seed: everything that matters must come from the checkpoint.
        loads.append(0)
        resumed, resumed_dir = _train(root, out, seed=123, ckpt_path=interrupted_checkpoint)
    again, _ = _train(root, out, seed=0)
    return {
        "root": root,
        "out": out,
        "first": first,
        "resumed": resumed,
        "again": again,
        "dirs": [first_dir, interrupted_dir, resumed_dir],
        "checkpoints": {first_checkpoint: snapshot, interrupted_checkpoint: interrupted_snapshot},
        "weight_loads": {"first": loads[0], "interrupted": loads[1], "resumed": loads[2]},
    }


def test_a_resumed_run_keeps_the_checkpoints_backbone_and_loads_no_weights(runs: dict) -> None:
    # A fresh run loads the ImageNet weights once; a resumed one has them from the checkpoint (no download).
    assert runs["weight_loads"] == {"first": 1, "interrupted": 1, "resumed": 0}


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(runs: dict) -> None:
    first, resumed = runs["first"], runs["resumed"]
    assert first.trainer.global_step == resumed.trainer.global_step == 2 * EPOCHS
    assert state_equal(first.state_dict(), resumed.state_dict())  # bit for bit, every tensor and buffer


def test_results_folders_are_versioned_never_overwritten(runs: dict) -> None:
    versions = [path.resolve() for path in runs["dirs"]]
    assert [path.name for path in versions] == ["v0", "v1", "v2"]
    for checkpoint, content in runs["checkpoints"].items():  # later runs left earlier results alone
        assert checkpoint.read_bytes() == content
    assert (versions[2] / "weights" / "lightning" / "model.ckpt").is_file()
    assert (runs["out"] / "ADTR" / "part" / "latest").resolve().name == "v3"


def test_two_runs_with_the_same_seed_give_the_same_scores(runs: dict) -> None:
    first, again = runs["first"], runs["again"]
    assert state_equal(first.state_dict(), again.state_dict())
    assert torch.equal(_scores(first, runs["root"]), _scores(again, runs["root"]))
