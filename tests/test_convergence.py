"""The learning-curve script (``benchmarks/convergence.py``) trains on standardised features and scores each epoch."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import convergence


@pytest.fixture
def tiny_curve(tiny_textures_root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A small recipe and the train and test features of the tiny brick textures for it."""
    monkeypatch.setattr(convergence, "dataset_root", lambda name: tiny_textures_root)
    recipe = replace(convergence.RECIPES_TRIED["fast_stride8_mlp"], image_size=64)
    return recipe, *convergence.features_for("brick", recipe, {})


def test_curve_trains_on_standardised_package_features_and_scores_each_epoch(tiny_curve: tuple) -> None:
    recipe, train, test = tiny_curve

    # Standardised with the statistics of these same training images: per channel, mean 0 and deviation 1.
    channels = train.features.transpose(0, 1).flatten(1)
    assert channels.mean(dim=1).abs().max() < 1e-3
    assert (channels.std(dim=1) - 1).abs().max() < 1e-2
    rows = convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1, 2])
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        for column in ("pixel_AUROC", "pixel_AUPRO", "image_AUROC_pool16_max"):
            assert 0.0 <= row[column] <= 1.0, (column, row[column])


def test_time_limit_ends_the_curve_at_the_first_test_past_it(tiny_curve: tuple) -> None:
    recipe, train, test = tiny_curve
    rows = convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1, 2, 3], time_limit=0.0)

    assert [row["epoch"] for row in rows] == [1]  # any training takes more than 0 s: stopped after the first test


def test_a_gpu_run_without_a_gpu_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(convergence.torch.cuda, "is_available", lambda: False)
    output = tmp_path / "curves.csv"
    monkeypatch.setattr("sys.argv", ["convergence.py", "--device", "cuda", "--output", str(output)])

    with pytest.raises(SystemExit) as stopped:
        convergence.main()

    assert stopped.value.code == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err
    assert not output.exists()


def test_gpu_runs_are_told_apart_from_cpu_runs_of_the_same_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = convergence.RECIPES_TRIED["paper"]
    cpu = convergence.run_settings(recipe, [2, 4], convergence.torch.device("cpu"))
    gpu = convergence.run_settings(recipe, [2, 4], convergence.torch.device("cuda"))
    # CPU rows keep the settings written before GPU runs existed, so a resumed ablation still finds them.
    assert cpu == repr({**convergence.recipe_settings(recipe), "eval_epochs": [2, 4]})
    assert gpu != cpu

    monkeypatch.setattr(convergence.torch.cuda, "is_bf16_supported", lambda: True)
    output = tmp_path / "curves.csv"
    row = {"epoch": 1, "train_seconds": 1.0, "loss": 0.5}
    convergence.write_rows(output, "brick", "paper", 0, gpu, [row], convergence.torch.device("cuda"))
    convergence.write_rows(output, "brick", "paper", 0, cpu, [row])
    with output.open(newline="") as handle:
        machines = [record["machine"] for record in csv.DictReader(handle)]
    assert machines[0].endswith("bf16 training on cuda"), machines
    assert machines[1].endswith(" training"), machines


def test_every_curve_stage_of_the_gpu_script_names_arms_and_options_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(convergence.__file__).with_name("gpu_ceiling.sh").read_text()
    stages = [
        line.split(" curves ", 1)[1].split()
        for line in script.splitlines()
        if line.startswith("stage ") and " curves " in line
    ]
    assert len(stages) == 3, stages
    runs: list[tuple[str, str, int]] = []
    monkeypatch.setattr(convergence, "features_for", lambda *args: (None, None))
    monkeypatch.setattr(convergence, "train_curve", lambda *args: [])
    monkeypatch.setattr(
        convergence, "write_rows", lambda path, dataset, recipe, seed, *rest: runs.append((dataset, recipe, seed))
    )
    for stage in stages:
        runs.clear()
        argv = ["convergence.py", "--datasets", "bsdata", *stage, "--output", str(tmp_path / "curves.csv")]
        monkeypatch.setattr("sys.argv", argv)
        convergence.main()  # SystemExit from argparse on an arm or option that does not exist
        recipes = stage[stage.index("--recipes") + 1 : stage.index("--seeds")]
        seeds = [int(seed) for seed in stage[stage.index("--seeds") + 1 : stage.index("--eval-epochs")]]
        assert runs == [("bsdata", recipe, seed) for recipe in recipes for seed in seeds]


def test_fusing_the_mean_control_with_itself_leaves_its_scores(
    tiny_textures_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Averaging two z-scored maps that are the same map gives that map: the fused columns must equal the posz ones.
    monkeypatch.setattr(convergence, "dataset_root", lambda name: tiny_textures_root)
    recipe = replace(convergence.RECIPES_TRIED["fast_stride8_mean"], image_size=64)
    train, test = convergence.features_for("brick", recipe, {})

    [row] = convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1])

    assert row["pixel_AUROC_fused_mean"] == pytest.approx(row["pixel_AUROC_posz"], abs=1e-6)
    assert row["pixel_AUPRO_fused_mean"] == pytest.approx(row["pixel_AUPRO_posz"], abs=1e-6)
    assert row["image_AUROC_fused_mean_pool16_max"] == pytest.approx(row["image_AUROC_posz_pool16_max"], abs=1e-6)
    assert row["pixel_AUROC_fused_zero"] != pytest.approx(row["pixel_AUROC_posz"], abs=1e-6)  # another map


def test_a_long_schedule_arm_spans_its_epochs_whatever_the_tests(
    tiny_curve: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, train, test = tiny_curve
    spans: list[int] = []
    schedule = convergence.lr_scheduler
    monkeypatch.setattr(
        convergence,
        "lr_scheduler",
        lambda opt, kind, total, warmup: spans.append(total) or schedule(opt, kind, total, warmup),
    )
    steps = -(-len(train.features) // recipe.batch_size)

    convergence.train_curve(replace(recipe, schedule_epochs=24), train, test, seed=0, eval_epochs=[1])
    convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1])

    assert spans == [24 * steps, steps]
