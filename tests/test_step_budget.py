"""Training length in optimiser steps: the same training for a small data set as for a large one."""

from __future__ import annotations

from pathlib import Path

import pytest
from anomalib.engine import Engine

from adtr_anomalib import ADTR
from adtr_anomalib.data import mvtec_layout_folder
from adtr_anomalib.models.adtr.components.training import step_budget
from tests.conftest import TINY


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_a_budget_that_is_no_whole_number_of_steps_is_refused_by_name(steps: object) -> None:
    with pytest.raises((ValueError, TypeError), match="optimiser steps"):
        step_budget(steps)  # type: ignore[arg-type]


def test_the_budget_counts_steps_across_epochs_and_validates_once_at_the_end(
    tiny_textures_root: Path, tmp_path: Path
) -> None:
    validations: list[int] = []

    class Counting(ADTR):
        def on_validation_start(self) -> None:
            validations.append(self.global_step)
            super().on_validation_start()

    datamodule = mvtec_layout_folder(tiny_textures_root, train_batch_size=3, eval_batch_size=4)
    model = Counting(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, recipe="fast", **TINY)
    engine = Engine(default_root_dir=tmp_path, logger=False, **step_budget(5))
    engine.fit(model=model, datamodule=datamodule)

    # 8 training images at batch 3 are 3 steps an epoch: 5 steps end inside the second epoch, which counts as run.
    assert len(datamodule.train_data) == 8
    assert engine.trainer.global_step == 5
    assert engine.trainer.current_epoch == 2
    assert validations == [5]
    assert bool(model.model.map_statistics_fitted)
