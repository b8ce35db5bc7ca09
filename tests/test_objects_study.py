"""The recipe decision of ``benchmarks/objects_study.py`` and the position statistic of ``position_structure.py``."""

from __future__ import annotations

import torch

from benchmarks import objects_study, position_structure


def _row(dataset: str, arm: objects_study.Arm, seed: int, auroc: float) -> dict[str, str]:
    planned = "eval_steps" if arm.column == "step" else "eval_epochs"
    return {
        "dataset": dataset,
        "recipe": arm.recipe,
        "seed": str(seed),
        arm.column: str(arm.value),
        "settings": repr({planned: [arm.value]}),
        "pixel_AUROC": str(auroc),
    }


def test_a_candidate_that_loses_on_one_set_beyond_the_seed_spread_is_rejected_unless_that_set_is_left_out() -> None:
    baseline, candidate = objects_study.BASELINE, objects_study.CANDIDATES[0]
    rows = [
        *(_row("juice", baseline, seed, 0.70 + 0.001 * seed) for seed in (0, 1)),
        *(_row("juice", candidate, seed, 0.85 + 0.001 * seed) for seed in (0, 1)),
        *(_row("bsdata", baseline, seed, 0.99 + 0.001 * seed) for seed in (0, 1)),
        *(_row("bsdata", candidate, seed, 0.98 + 0.001 * seed) for seed in (0, 1)),  # 0.01 below, spread 0.0007
    ]
    diffs = objects_study.differences(rows, candidate)

    assert objects_study.decision(diffs).startswith("reject")
    assert "bsdata pixel AUROC -0.010" in objects_study.decision(diffs)
    assert objects_study.decision(diffs, left_out="bsdata").startswith("adopt")
    assert objects_study.decision(diffs, left_out="juice").startswith("reject")
    # A row planned for another length is not the arm's: a 24-epoch schedule tested at epoch 6 is left out.
    longer = {**_row("juice", baseline, 2, 0.1), "settings": repr({"eval_epochs": [6, 24]})}
    assert objects_study.arm_values([*rows, longer], baseline, "juice", "pixel_AUROC") == [0.70, 0.701]


def test_the_between_position_share_is_zero_for_a_stationary_surface_and_one_for_position_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    stationary = torch.randn(64, 3, 8, 8, generator=generator)
    assert position_structure.between_position_share(stationary) < 0.05
    layout = torch.randn(1, 3, 8, 8, generator=generator)
    posed = layout.expand(64, -1, -1, -1) + 0.01 * torch.randn(64, 3, 8, 8, generator=generator)
    assert position_structure.between_position_share(posed) > 0.95
