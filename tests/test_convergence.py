"""The learning-curve script (``benchmarks/convergence.py``) trains on standardised features and scores each epoch."""

from __future__ import annotations

import csv
import os
import subprocess
from collections.abc import Iterator
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
    rows = list(convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1, 2]))
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        for column in ("pixel_AUROC", "pixel_AUPRO", "image_AUROC_pool16_max"):
            assert 0.0 <= row[column] <= 1.0, (column, row[column])


def test_time_limit_ends_the_curve_after_the_first_epoch_past_it_and_tests_there(tiny_curve: tuple) -> None:
    recipe, train, test = tiny_curve
    rows = list(convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[2, 3], time_limit=0.0))

    # Any training takes more than 0 s: stopped after epoch 1, which is tested although no test was planned there.
    assert [row["epoch"] for row in rows] == [1]


def test_a_run_cut_short_keeps_the_rows_it_tested_and_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[int] = []

    def cut_short(*args: object) -> Iterator[dict[str, float]]:
        trained.append(1)
        yield {"epoch": 2, "train_seconds": 1.0, "loss": 0.5}
        raise KeyboardInterrupt  # as a stage's wall-clock cap ends the process

    def whole(*args: object) -> Iterator[dict[str, float]]:
        trained.append(2)
        yield from ({"epoch": epoch, "train_seconds": float(epoch), "loss": 0.5} for epoch in (2, 4))

    monkeypatch.setattr(convergence, "features_for", lambda *args: (None, None))
    output = tmp_path / "curves.csv"
    argv = ["convergence.py", "--datasets", "bsdata", "--recipes", "paper", "--seeds", "0", "--output", str(output)]
    monkeypatch.setattr("sys.argv", [*argv, "--eval-epochs", "2", "4"])

    monkeypatch.setattr(convergence, "train_curve", cut_short)
    with pytest.raises(KeyboardInterrupt):
        convergence.main()
    with output.open(newline="") as handle:
        assert [(r["recipe"], r["epoch"]) for r in csv.DictReader(handle)] == [("paper", "2")]

    monkeypatch.setattr(convergence, "train_curve", whole)
    convergence.main()  # the run that was cut short is trained again
    convergence.main()  # the finished one is not
    assert trained == [1, 2]
    # A run that --time-limit stopped early has ended too: its last test is past the limit.
    monkeypatch.setattr("sys.argv", [*argv, "--eval-epochs", "2", "4", "8", "--time-limit", "3"])
    convergence.main()
    convergence.main()
    assert trained == [1, 2, 2]


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


def test_the_gpu_script_runs_every_stage_with_arms_and_options_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The script itself runs, with a stand-in for python that records its arguments: a stage that cannot start
    # (as a shell function under `timeout` once could not) is caught here, not on a rationed GPU.
    calls = tmp_path / "calls"
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\037" "$@" >> "$CALLS"\necho >> "$CALLS"\n')
    stand_in.chmod(0o755)
    script = Path(convergence.__file__).with_name("gpu_ceiling.sh")
    env = {**os.environ, "PYTHON": str(stand_in), "CALLS": str(calls), "ADTR_SHARED_DATA": str(tmp_path / "data")}
    out = tmp_path / "out"
    subprocess.run(["bash", str(script), str(out)], check=True, env=env, capture_output=True, timeout=60)

    invocations = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]
    assert [call[0] for call in invocations] == ["benchmarks/convergence.py"] * 3 + ["-m"], invocations
    assert "== stage ended" not in (out / "gpu_ceiling.log").read_text()  # everything printed is kept
    runs: list[tuple[str, str, int]] = []
    monkeypatch.setattr(convergence.torch.cuda, "is_available", lambda: True)  # the stages name --device cuda
    monkeypatch.setattr(convergence, "features_for", lambda *args: (None, None))
    monkeypatch.setattr(convergence, "train_curve", lambda *args: iter([{}]))
    monkeypatch.setattr(
        convergence, "write_rows", lambda path, dataset, recipe, seed, *rest: runs.append((dataset, recipe, seed))
    )
    for stage in invocations[:3]:
        runs.clear()
        monkeypatch.setattr("sys.argv", ["convergence.py", *stage[1:]])
        convergence.main()  # SystemExit from argparse on an arm or option that does not exist
        recipes = stage[stage.index("--recipes") + 1 : stage.index("--seeds")]
        seeds = [int(seed) for seed in stage[stage.index("--seeds") + 1 : stage.index("--eval-epochs")]]
        assert runs == [("bsdata", recipe, seed) for recipe in recipes for seed in seeds]
    benchmark = invocations[3]
    assert benchmark[1] == "adtr_anomalib.benchmark"
    assert Path(benchmark[benchmark.index("--config") + 1]).is_file()


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

    list(convergence.train_curve(replace(recipe, schedule_epochs=24), train, test, seed=0, eval_epochs=[1]))
    list(convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1]))

    assert spans == [24 * steps, steps]


def test_runs_of_one_arm_on_schedules_of_different_lengths_can_be_told_apart() -> None:
    from benchmarks import plot_convergence

    recipe = convergence.RECIPES_TRIED["fast_stride8_local1"]
    cuda = convergence.torch.device("cuda")

    def row(eval_epochs: list[int], value: float) -> dict[str, str]:
        settings = convergence.run_settings(recipe, eval_epochs, cuda)
        head = {"dataset": "bsdata", "recipe": "fast_stride8_local1", "seed": "0", "epoch": "6", "commit": "abc"}
        return {**head, "train_seconds": "1", "pixel_AUROC": str(value), "settings": settings}

    curves = [row([2, 4, 6], 0.25), row([6, 12, 25, 50], 0.75)]

    [merged] = plot_convergence.summarise(curves)  # as before: the later run stands for the seed
    assert (merged["recipe"], merged["pixel_AUROC_mean"]) == ("fast_stride8_local1 on cuda", 0.75)
    apart = {entry["recipe"]: entry["pixel_AUROC_mean"] for entry in plot_convergence.summarise(curves, True)}
    assert apart == {
        "fast_stride8_local1 on cuda, 6-epoch schedule": 0.25,
        "fast_stride8_local1 on cuda, 50-epoch schedule": 0.75,
    }


def test_a_step_budget_trains_that_many_steps_whatever_the_set_size_and_tests_at_each_planned_step(
    tiny_curve: tuple,
) -> None:
    recipe, train, test = tiny_curve
    # 8 tiny training images at batch 16: one step per epoch, so 3 steps need 3 epochs.
    rows = list(convergence.train_curve(recipe, train, test, seed=0, eval_epochs=[1], eval_steps=[2, 3], light=True))

    assert [(row["epoch"], row["step"]) for row in rows] == [(2, 2), (3, 3)]
    # The light test keeps the maps' columns and leaves out the costly extras.
    assert {"pixel_AUROC", "pixel_AUROC_whiten", "pixel_AUROC_posz"} <= set(rows[0])
    assert not any(key.startswith(("pixel_AUROC_fused", "pixel_AUROC_blur")) for key in rows[0])
