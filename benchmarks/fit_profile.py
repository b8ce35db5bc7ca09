"""Where ``Engine.fit`` spends an ADTR training run: seconds per optimiser step end to end against the steps alone.

One ``Engine.fit`` per data set, as ``configs/adtr/lite0_offline.yaml`` trains (Lite0, the recommended recipe, 10% of
the training images held back for the synthetic validation split, 16 images a batch), timed by a Lightning callback:

- ``steps``: the training steps themselves (``on_train_batch_start`` to ``on_train_batch_end``: forward, loss,
  backward, optimiser), split into the first epoch (which runs the backbone and fills the feature cache) and the rest
  (cached features: the transformer alone);
- ``data``: waiting for the next batch (from one step's end to the next one's start: decoding, resizing, collating);
- ``start``: from the fit's start to the first step (set-up and the per-channel feature statistics pass);
- ``validation``: the map-statistics pass over the training images and the validation images;
- ``fit``: the whole ``Engine.fit`` call, so ``other`` is what none of the above covers (checkpoints, loggers).

Then the transformer's step alone, timed on features of the data set's shape (``benchmarks/training_speed.py``'s
method) for the row ``transformer_step``. Run it with nothing else heavy on the machine.

    python benchmarks/fit_profile.py --datasets brick juice --steps 60 --output benchmarks/results/fit_profile.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the data sets are the sibling convergence.py's
from convergence import DATASETS, SHARED_DATA, dataset_root  # the benchmarks folder is on the script's path
from lightning.pytorch import Callback, LightningModule, Trainer

from adtr_anomalib import ADTR
from adtr_anomalib.benchmark.measure import provenance
from adtr_anomalib.benchmark.report import append_csv
from adtr_anomalib.data import HELD_OUT_VALIDATION, mvtec_layout_folder
from adtr_anomalib.models.adtr.components.settings import DEFAULT_RECIPE
from adtr_anomalib.models.adtr.components.training import step_budget
from adtr_anomalib.post_processing import RankPreservingPostProcessor

# Every development set: the learning curves' five, and the MVTec AD bottles (image labels only: no pixel metrics
# there, but their fit costs what any fit does).
PROFILED = (*DATASETS, "bottle")


def _root(dataset: str) -> Path:
    return SHARED_DATA / "bottle" if dataset == "bottle" else dataset_root(dataset)


class PhaseTimer(Callback):
    """Wall-clock seconds of each phase of a fit (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(
            ("start", "data", "steps_first", "steps_rest", "validation"), 0.0
        )
        self.steps = {"first": 0, "rest": 0}
        self._mark = 0.0
        self._phase_start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        del pl_module, args
        now = time.perf_counter()
        key = "start" if trainer.global_step == 0 and self.steps["first"] == 0 else "data"
        self.seconds[key] += now - self._mark
        self._phase_start = now

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        del pl_module, args
        now = time.perf_counter()
        epoch = "first" if trainer.current_epoch == 0 else "rest"
        self.seconds[f"steps_{epoch}"] += now - self._phase_start
        self.steps[epoch] += 1
        self._mark = now

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        self._phase_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer, pl_module
        now = time.perf_counter()
        self.seconds["validation"] += now - self._phase_start
        self._mark = now


def transformer_step_seconds(model: ADTR, shape: tuple[int, ...], steps: int = 8) -> float:
    """Fastest training step of ``model``'s transformer alone on random features of ``shape`` (bf16 as in fit)."""
    reconstructor = model.model.reconstructor.train()
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=1e-5)
    features = torch.randn(shape)
    best = float("inf")
    for _ in range(steps):
        started = time.perf_counter()
        loss = model.loss(features, model.reconstruct_for_training(features))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        best = min(best, time.perf_counter() - started)
    return best


def profile(dataset: str, steps: int, recipe: str, workers: int) -> dict[str, Any]:
    """Fit ADTR on ``dataset`` for ``steps`` optimiser steps and return the row of seconds per phase."""
    torch.manual_seed(0)
    datamodule = mvtec_layout_folder(
        _root(dataset), train_batch_size=16, eval_batch_size=16, num_workers=workers, **HELD_OUT_VALIDATION
    )
    model = ADTR(
        backbone="tf_efficientnet_lite0", recipe=recipe, post_processor=RankPreservingPostProcessor(), visualizer=False
    )
    timer = PhaseTimer()
    engine = Engine(callbacks=[timer], logger=False, default_root_dir="/tmp/adtr_fit_profile", **step_budget(steps))
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit = time.perf_counter() - started
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        shape = tuple(model.model.extract_features(model.pre_processor(batch.image)).shape)
    alone = transformer_step_seconds(model, shape)
    total_steps = timer.steps["first"] + timer.steps["rest"]
    covered = sum(timer.seconds.values())
    row = {
        "dataset": dataset,
        "recipe": recipe,
        "workers": workers,
        "train_images": len(datamodule.train_data),
        "steps": total_steps,
        "fit_seconds": round(fit, 1),
        "seconds_per_step": round(fit / max(total_steps, 1), 3),
        "transformer_step": round(alone, 3),
        **{f"{k}_seconds": round(v, 1) for k, v in timer.seconds.items()},
        "other_seconds": round(fit - covered, 1),
        "step_first_epoch": round(timer.seconds["steps_first"] / max(timer.steps["first"], 1), 3),
        "step_cached": round(timer.seconds["steps_rest"] / max(timer.steps["rest"], 1), 3),
        **provenance(),
    }
    print(" ".join(f"{k}={v}" for k, v in row.items() if k not in provenance()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(PROFILED), choices=list(PROFILED))
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per fit")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers (the configs use 2)")
    parser.add_argument("--output", type=Path, default=None, help="append the rows to this CSV")
    args = parser.parse_args()
    rows = [profile(dataset, args.steps, args.recipe, args.workers) for dataset in args.datasets]
    if args.output is not None:
        append_csv(rows, args.output)


if __name__ == "__main__":
    main()
