"""Whole benchmarks on a tiny dataset: the table, seeds, resume, the plot, failing jobs and ADTR+ jobs."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest
import torch

from adtr_anomalib import ADTR
from adtr_anomalib.benchmark import cli, run
from adtr_anomalib.benchmark.models import METRICS
from adtr_anomalib.benchmark.report import COSTS, format_value
from adtr_anomalib.data import make_texture_dataset
from tests.conftest import TINY

TINY_ADTR = {"name": "adtr", "epochs": 1, "init_args": {**TINY, "lr": 1e-3, "lr_schedule": "cosine"}}
CONFETTI = {"synthetic_anomalies": {"class_path": "adtr_anomalib.data.ConfettiNoise"}}


def _argv(data: Path, output: Path, models: list, seeds: list[int], *extra: str) -> list[str]:
    return [
        *("--data", json.dumps([str(data)]), "--models", json.dumps(models), "--seeds", json.dumps(seeds)),
        *("--image_size", "64", "--batch_size", "8", "--output", str(output), *extra),
    ]


@pytest.fixture
def jobs_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the jobs actually run (not taken from an earlier run)."""
    ran: list[str] = []
    original = run.run_job

    def spy(job, *args, **kwargs):
        ran.append(job.key)
        return original(job, *args, **kwargs)

    monkeypatch.setattr(run, "run_job", spy)
    return ran


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_models_two_seeds_table_resume_and_plot(tiny_textures_root, tmp_path, jobs_run, capsys) -> None:
    out = tmp_path / "bench"
    assert cli(_argv(tiny_textures_root, out, [TINY_ADTR, "padim"], [0])) == 0
    assert jobs_run == ["ADTR on brick, seed 0", "PaDiM on brick, seed 0"]
    first_csv = (out / "results.csv").read_text()
    assert (out / "accuracy_vs_throughput.png").read_bytes().startswith(b"\x89PNG")

    # The same folder without --resume: refused, nothing run, nothing overwritten.
    assert cli(_argv(tiny_textures_root, out, [TINY_ADTR, "padim"], [0, 1])) == 2
    assert re.search(r"jobs\.jsonl' holds an earlier benchmark: pass --resume", capsys.readouterr().err)
    jobs_run.clear()
    assert cli(_argv(tiny_textures_root, out, [TINY_ADTR, "padim"], [0, 1], "--resume")) == 0
    assert jobs_run == ["ADTR on brick, seed 1", "PaDiM on brick, seed 1"]  # seed 0 not recomputed
    assert "ADTR on brick, seed 0: finished in an earlier run, kept" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == first_csv

    rows = _csv(out / "results_1.csv")
    assert [(r["model"], r["seed"], r["status"]) for r in rows] == [
        ("ADTR", "0", "ok"),
        ("PaDiM", "0", "ok"),
        ("ADTR", "1", "ok"),
        ("PaDiM", "1", "ok"),
    ]
    earlier = {(r["model"], r["seed"]): r for r in _csv(out / "results.csv")}
    for row in rows:
        assert all(0.0 <= float(row[metric]) <= 1.0 for metric in METRICS)
        assert all(float(row[cost]) > 0 for cost in COSTS)
        if row["seed"] == "0":  # kept, not recomputed
            assert row == earlier[(row["model"], "0")]

    table = (out / "results_1.md").read_text().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["dataset", "model", "seeds", "epochs", "steps"]
    assert header[5:] == [*METRICS, *COSTS]
    for line, model in zip(table[2:4], ["ADTR", "PaDiM"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == ["brick", model, "0, 1"]
        for metric, cell in zip(METRICS, cells[5:], strict=False):
            values = [float(r[metric]) for r in rows if r["model"] == model]
            mean, std = format_value(metric, statistics.fmean(values)), format_value(metric, statistics.stdev(values))
            assert cell == f"{mean} ± {std}"
    assert (out / "accuracy_vs_throughput_1.png").read_bytes().startswith(b"\x89PNG")


def test_a_step_budget_trains_adtr_that_many_steps_while_padim_keeps_its_single_pass(
    tiny_textures_root, tmp_path
) -> None:
    stepped = {"name": "adtr", "steps": 3, "init_args": TINY_ADTR["init_args"]}
    assert cli(_argv(tiny_textures_root, tmp_path / "bench", [stepped, "padim"], [0])) == 0
    rows = {row["model"]: row for row in _csv(tmp_path / "bench" / "results.csv")}
    # 8 training images at batch 8: one step an epoch, so 3 steps are 3 epochs.
    assert (rows["ADTR"]["steps"], rows["ADTR"]["epochs"]) == ("3", "3")
    assert rows["PaDiM"]["epochs"] == "1"


def test_a_failing_job_fails_the_command_names_it_and_the_others_still_run(tiny_textures_root, tmp_path, capsys):
    broken = {"name": "adtr_plus", "label": "ADTR+ broken", "epochs": 1}
    broken["init_args"] = {**TINY, "adtr_checkpoint": str(tmp_path / "missing.ckpt")}
    out = tmp_path / "bench"
    assert cli(_argv(tiny_textures_root, out, [broken, "padim"], [0])) == 1
    err = capsys.readouterr().err
    assert re.search(r"1 of 2 jobs FAILED:\n  ADTR\+ broken on brick, seed 0: FileNotFoundError: .*missing\.ckpt", err)
    rows = _csv(out / "results.csv")
    assert [(r["model"], r["status"]) for r in rows] == [("ADTR+ broken", "failed"), ("PaDiM", "ok")]
    assert "missing.ckpt" in rows[0]["error"]
    assert 0.0 <= float(rows[1]["pixel_AUPRO"]) <= 1.0
    report = (out / "results.md").read_text()
    rows_of_report = [
        [c.strip() for c in line.strip("|").split("|")] for line in report.splitlines() if line[:1] == "|"
    ]
    assert ["brick", "ADTR+ broken", "none (failed: 0)"] in [cells[:3] for cells in rows_of_report]
    assert "Failed jobs:\n- ADTR+ broken on brick, seed 0: FileNotFoundError" in report


def test_adtr_plus_starts_from_the_adtr_checkpoint_of_its_dataset_and_seed(
    tiny_textures_root, tmp_path, monkeypatch
) -> None:
    built = []
    original = run.build_model

    def spy(name, *args, **options):
        built.append((name, options.get("adtr_checkpoint"), model := original(name, *args, **options)))
        return model

    monkeypatch.setattr(run, "build_model", spy)
    plus = {"name": "adtr_plus", "start_from": "ADTR", "epochs": 1, "init_args": {**TINY, "supervision": "pixel"}}
    plus["train_anomalies"] = CONFETTI
    out = tmp_path / "bench"
    argv = _argv(tiny_textures_root, out, [TINY_ADTR, plus], [0], "--max_test_images_per_label", "3")
    assert cli(argv) == 0
    records = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["ADTR", "ADTR+"]
    assert [(name, checkpoint) for name, checkpoint, _ in built] == [
        ("adtr", None),
        ("adtr_plus", records[0]["checkpoint"]),
    ]
    assert bool(built[1][2].adtr_checkpoint_loaded)
    assert type(built[1][2].trainer.datamodule).__name__ == "WithAnomalies"
    assert len(built[1][2].trainer.datamodule.test_data) == 6  # 3 good + 3 anomalous, as for ADTR


def test_moved_anomalies_leave_every_test_set_and_only_the_labelled_adtr_plus_trains_on_them(tmp_path, monkeypatch):
    """The BSData ADTR+ experiment's shape: ADTR, the ADTR control trained further, ADTR+ on the moved images."""
    root = make_texture_dataset(
        tmp_path / "data", "brick", image_size=64, n_train=8, n_test_good=4, n_test_defect_per_type=2
    )
    built: list = []  # the models in job order
    original_build = run.build_model

    def spy(name, *args, **options):
        built.append(model := original_build(name, *args, **options))
        return model

    starts: list[tuple[str, dict]] = []
    original_load = ADTR.load_network_weights

    def load(self, path, argument="checkpoint"):
        original_load(self, path, argument)
        starts.append((str(path), {k: v.clone() for k, v in self.model.reconstructor.state_dict().items()}))

    monkeypatch.setattr(run, "build_model", spy)
    monkeypatch.setattr(ADTR, "load_network_weights", load)
    continued = {**TINY_ADTR, "label": "ADTR (continued)", "start_from": "ADTR"}
    labelled = {"name": "adtr_plus", "start_from": "ADTR", "epochs": 1, "init_args": {**TINY, "supervision": "pixel"}}
    labelled["train_anomalies"] = {"train_on_moved": True}
    out = tmp_path / "bench"
    assert cli(_argv(root, out, [TINY_ADTR, continued, labelled], [0], "--move_from_test", "1")) == 0
    records = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["ADTR", "ADTR (continued)", "ADTR+"]
    assert all(r["status"] == "ok" for r in records)

    adtr, control, plus = built
    moved = set(plus.trainer.datamodule.moved_anomalies["image_path"])
    assert len(moved) == 4  # one of each of the 4 defect types
    tests = [sorted(model.trainer.datamodule.test_data.samples["image_path"]) for model in (adtr, control, plus)]
    assert tests[0] == tests[1] == tests[2]  # the same test set for every model
    assert len(tests[0]) == 8  # 4 good + 8 defective, 4 of them moved
    assert not moved & set(tests[0])
    train = [model.trainer.datamodule.train_data.samples for model in built]
    assert set(train[2]["image_path"]) >= moved
    assert [(samples["label_index"] == 1).sum() for samples in train] == [0, 0, 4]  # only ADTR+ (labelled)

    # The control and ADTR+ start from the ADTR job's checkpoint (its trained transformer), not from scratch.
    assert [path for path, _ in starts] == [records[0]["checkpoint"]] * 2
    trained = torch.load(records[0]["checkpoint"], weights_only=False)["state_dict"]
    for _, state in starts:
        for key, value in state.items():
            torch.testing.assert_close(value, trained[f"model.reconstructor.{key}"])
    assert bool(plus.adtr_checkpoint_loaded)
