"""The comparison helpers: every model gets the same backbone weights and pre-processing; tables and subsets."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from anomalib.data.utils import ValSplitMode

import adtr_anomalib.benchmark
from adtr_anomalib.benchmark import build_model, markdown_table, measure, run, write_csv
from adtr_anomalib.benchmark.plan import DataSpec
from adtr_anomalib.benchmark.report import NUMERIC, summarise, summary_table
from adtr_anomalib.data import mvtec_layout_folder, subsample_splits
from adtr_anomalib.models.adtr.components.backbone import offline_weights_file
from adtr_anomalib.post_processing import RankPreservingPostProcessor


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_baselines_get_the_offline_lite0_weights_and_backbone_normalisation(name: str) -> None:
    model = build_model(name, image_size=64)
    packaged = torch.load(offline_weights_file("tf_efficientnet_lite0"), weights_only=True)
    stem = model.model.feature_extractor.feature_extractor.conv_stem.weight
    torch.testing.assert_close(stem, packaged["_conv_stem.weight"])
    normalize = model.pre_processor.transform.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.5, 0.5]


def test_unknown_model_is_refused_with_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown model 'fastflow'; choose from \['adtr', 'adtr_plus', 'padim', 'patchcore'\]"
    ):
        build_model("fastflow")


@pytest.mark.parametrize(("name", "expected"), [("ADTRPlus", "ADTRPlus"), ("ADTR+", "ADTRPlus"), ("Padim", "Padim")])
def test_models_are_found_by_class_name_or_short_name(name: str, expected: str) -> None:
    assert type(build_model(name, image_size=64)).__name__ == expected


def test_arguments_every_model_shares_or_does_not_take_are_refused() -> None:
    with pytest.raises(ValueError, match=r"padim: init_args \['pre_trained'\] are set by the benchmark"):
        build_model("padim", pre_trained=True)
    with pytest.raises(ValueError, match=r"patchcore: unknown init_args \['n_features'\]; Patchcore takes"):
        build_model("patchcore", n_features=10)


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row, without their padding."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_markdown_table_formats_metrics_and_seconds() -> None:
    table = markdown_table([{"model": "adtr", "pixel_AUROC": 0.97654, "fit_s": 12.6, "epochs": 3}])
    header, rule, row = table.splitlines()
    assert _cells(header) == ["model", "pixel_AUROC", "fit_s", "epochs"]
    assert set(rule) == {"|", "-"}
    assert _cells(row) == ["adtr", "0.977", "13", "3"]


def test_results_csv_never_overwrites_earlier_results(tmp_path) -> None:
    first = write_csv([{"model": "adtr", "pixel_AUROC": 0.9}], tmp_path)
    second = write_csv([{"model": "padim", "pixel_AUROC": 0.8}], tmp_path)
    assert (first.name, second.name) == ("results.csv", "results_1.csv")
    assert "adtr" in first.read_text()
    assert "padim" in second.read_text()


def _row(model: str, seed: int, status: str, value: float) -> dict:
    return {"dataset": "d", "model": model, "seed": seed, "status": status, "epochs": 1} | dict.fromkeys(NUMERIC, value)


def test_summary_gives_mean_and_sample_std_over_seeds_and_keeps_failed_rows() -> None:
    rows = [_row("m", 0, "ok", 0.8), _row("m", 1, "ok", 0.9), _row("broken", 0, "failed", math.nan)]
    summaries = summarise(rows)
    assert [(s["model"], s["seeds"], s["failed_seeds"]) for s in summaries] == [
        ("m", "0, 1", ""),
        ("broken", "none", "0"),
    ]
    assert summaries[0]["image_AUROC"] == pytest.approx(0.85)
    assert summaries[0]["image_AUROC_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    table = summary_table(summaries).splitlines()
    # Columns: dataset, model, seeds, epochs, steps (none: these rows trained by epochs), then the metrics.
    assert _cells(table[2])[:6] == ["d", "m", "0, 1", "1", "n/a", "0.850 ± 0.071"]
    assert _cells(table[3])[:6] == ["d", "broken", "none (failed: 0)", "1", "n/a", "n/a"]


def test_subsets_are_seeded_per_label_and_validation_follows_test(tiny_textures_root) -> None:
    def subset(seed: int) -> tuple[list[str], list[str], list[str]]:
        datamodule = mvtec_layout_folder(tiny_textures_root)
        datamodule.setup()
        subsample_splits(datamodule, max_train_images=5, max_test_images_per_label=2, seed=seed)
        return tuple(sorted(d.samples["image_path"]) for d in (datamodule.train_data, datamodule.test_data,
                                                               datamodule.val_data))  # fmt: skip

    train, test, val = subset(0)
    assert len(train) == 5
    assert len(test) == 4
    assert sum("/good/" in path for path in test) == 2
    assert val == test
    assert subset(0) == (train, test, val)
    assert subset(1) != (train, test, val)


def test_subset_limits_must_be_positive_integers(tiny_textures_root) -> None:
    datamodule = mvtec_layout_folder(tiny_textures_root)
    datamodule.setup()
    with pytest.raises(ValueError, match="max_test_images_per_label must be a positive integer"):
        subsample_splits(datamodule, max_test_images_per_label=0)


@pytest.mark.parametrize("name", ["adtr", "padim", "patchcore"])
def test_every_model_keeps_its_raw_score_ranking_in_the_test_metrics(name: str) -> None:
    assert isinstance(build_model(name, image_size=64).post_processor, RankPreservingPostProcessor)


def test_thresholds_come_from_held_back_training_images_not_the_test_images(tiny_textures_root) -> None:
    datamodule = DataSpec("tiny", str(tiny_textures_root)).build(seed=0, batch_size=4, num_workers=0)
    assert datamodule.val_split_mode == ValSplitMode.SYNTHETIC
    datamodule.setup()
    test = set(datamodule.test_data.samples["image_path"])
    assert not test & set(datamodule.val_data.samples["image_path"])


@pytest.mark.slow
def test_glibc_takes_patchcores_heap_setting_in_the_running_process() -> None:
    # In a child process: mallopt cannot give a process back glibc's dynamic default, and the tests train after this.
    code = (
        "import os; from adtr_anomalib.benchmark import limit_heap_fragmentation as limit; "
        "print(limit(), os.environ['MALLOC_MMAP_THRESHOLD_'])"
    )
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["True", "1048576"]  # this machine and CI run glibc


@pytest.mark.parametrize(("models", "applied"), [(["adtr", "patchcore"], 1), (["adtr", "padim"], 0)])
def test_the_heap_setting_is_applied_only_to_runs_with_patchcore(
    models: list[str], applied: int, tiny_textures_root, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No os.exec*: the setting is made in the running process, for every model of the run alike.
    for name in ("execv", "execve"):
        monkeypatch.setattr(os, name, lambda *args: pytest.fail("the benchmark re-executed itself"))
    calls: list[bool] = []
    monkeypatch.setattr(measure, "limit_heap_fragmentation", lambda: calls.append(True) or True)

    def not_run(*args) -> None:
        raise RuntimeError("not run in this test")  # the jobs are recorded as failed and listed: exit code 1

    monkeypatch.setattr(run, "run_job", not_run)
    argv = ["--data", json.dumps([str(tiny_textures_root)]), "--models", json.dumps(models), "--output", str(tmp_path)]
    assert adtr_anomalib.benchmark.main(argv) == 1
    assert len(calls) == applied


def test_peak_memory_sees_a_short_spike_inside_the_block_only() -> None:
    import numpy as np

    from adtr_anomalib.benchmark.measure import peak_memory

    with peak_memory() as spike:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, touched, then freed before the block ends
        del block
    with peak_memory() as quiet:
        pass
    assert spike.added_mb > 150  # the kernel's high-water mark kept the freed spike
    assert quiet.added_mb < 50  # and was reset for the next block


def test_timing_helpers_return_the_result_and_the_fastest_call() -> None:
    import time

    from adtr_anomalib.benchmark.measure import fastest_seconds, timed

    result, seconds = timed(lambda: time.sleep(0.02) or "done")
    assert result == "done"
    assert 0.015 < seconds < 1.0
    delays = iter([0.2, 0.05, 0.01, 0.05, 0.05, 0.05])  # the first call is the warm-up and is not timed
    fastest = fastest_seconds(lambda: time.sleep(next(delays)), min_calls=3, min_seconds=0.0)
    assert 0.005 < fastest < 0.04


def test_interleaved_timing_takes_turns_and_keeps_each_fastest_call() -> None:
    import time

    from adtr_anomalib.benchmark.measure import fastest_interleaved

    order: list[str] = []
    slow_delays = iter([0.2, 0.05, 0.03, 0.05])  # warm-up, then three timed calls: the fastest is 0.03

    def fast() -> None:
        order.append("fast")

    def slow() -> None:
        order.append("slow")
        time.sleep(next(slow_delays))

    fastest = fastest_interleaved([fast, slow], rounds=3)
    assert order == ["fast", "slow"] + ["fast", "slow"] * 3  # one warm-up each, then in turns
    assert fastest[0] < 0.01
    assert 0.025 < fastest[1] < 0.045
