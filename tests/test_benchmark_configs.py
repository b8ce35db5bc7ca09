"""The benchmark configs in configs/benchmark/: ours plan the jobs they promise; anomalib's pipeline runs its own."""

from __future__ import annotations

import json
import logging
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_CATEGORIES
from anomalib.data.datasets.image.visa import CATEGORIES as VISA_CATEGORIES
from anomalib.pipelines import Benchmark

from adtr_anomalib.benchmark.plan import parser, plan
from adtr_anomalib.models.adtr.components.settings import DEFAULT_STEPS
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "benchmark"
MODELS = ["ADTR", "ADTR+ (confetti)", "PaDiM", "PatchCore"]


def _plan(*argv: str) -> list:
    return plan(parser().parse_args(list(argv)))


@pytest.mark.parametrize(("name", "categories"), [("mvtec", MVTEC_CATEGORIES), ("visa", VISA_CATEGORIES)])
def test_dataset_configs_cover_every_category_with_four_models(name: str, categories: tuple, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    jobs = _plan("--config", str(CONFIGS / f"{name}.yaml"))
    datasets = list(dict.fromkeys(job.data.label for job in jobs))
    assert [label.split("/")[1] for label in datasets] == list(categories)
    assert [job.model.label for job in jobs[:4]] == MODELS
    assert len(jobs) == 4 * len(categories)
    plus = [job for job in jobs if job.model.key == "adtr_plus"]
    assert all(job.parent == f"ADTR on {job.data.label}, seed {job.seed}" for job in plus)


def test_folder_template_plans_one_dataset_three_seeds(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    jobs = _plan("--config", str(CONFIGS / "folder.yaml"))
    assert {job.data.label for job in jobs} == {"my_part"}
    assert sorted({job.seed for job in jobs}) == [0, 1, 2]
    assert len(jobs) == 12


def test_offline_config_runs_four_models_on_the_builtin_and_bsdata_sets(bsdata_root, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    config = yaml.safe_load((CONFIGS / "offline.yaml").read_text())
    assert config["data"] == ["builtin:brick", "../shared/data/bsdata_pitting"]
    assert config["backbone"] == "tf_efficientnet_lite0"
    # The BSData path is a setting: here the one the test suite uses.
    jobs = _plan("--config", str(CONFIGS / "offline.yaml"), "--data", json.dumps(["builtin:brick", str(bsdata_root)]))
    assert [(job.data.label, job.model.label) for job in jobs] == [
        (dataset, model) for dataset in ("brick", "bsdata_pitting") for model in MODELS
    ]


@pytest.mark.parametrize(
    ("models", "error"),
    [
        ("[{name: padim, init_args: {pre_trained: true}}]", r"models\[0\]: padim: init_args \['pre_trained'\] are set"),
        ("[{name: adtr, init_args: {lr_rate: 1}}]", r"models\[0\]: adtr: unknown init_args \['lr_rate'\]"),
        ("[{name: adtr, epoch: 3}]", r"models\[0\]: unknown keys \['epoch'\]"),
        ("[adtr, {name: adtr_plus, start_from: ADTR2}]", r"models\[1\] \(ADTR\+\): start_from='ADTR2' must be"),
        ("[adtr, {name: padim, start_from: ADTR}]", r"start_from is for adtr \(trained further\) and adtr_plus only"),
        ("[{name: adtr, train_anomalies: {}}]", r"train_anomalies is for adtr_plus only"),
        ("[adtr, {name: adtr_plus, train_anomalies: {move_from_test: 2}}]", r"(?s)train_anomalies: .*move_from_test"),
        ("[adtr, {name: adtr_plus, train_anomalies: {train_on_moved: true}}]", r"needs move_from_test > 0"),
        ("[adtr, adtr]", r"Labels must be unique, repeated: \['ADTR'\]; give the entries a 'label'"),
    ],
)
def test_config_mistakes_are_refused_before_anything_runs(models: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        _plan("--models", models)


def test_missing_folder_and_bad_datamodule_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"data\[0\]: No training images in"):
        _plan("--data", json.dumps([str(tmp_path)]))
    with pytest.raises(ValueError, match=r"(?s)data\[0\]: .*Option 'categroy' is not accepted"):
        _plan("--data", "[{class_path: MVTecAD, init_args: {categroy: bottle}}]")


@pytest.mark.slow
def test_anomalib_benchmark_config_runs_adtr_next_to_padim_and_patchcore(tiny_textures_root, tmp_path, monkeypatch):
    config = yaml.safe_load((CONFIGS / "anomalib_mvtec.yaml").read_text())
    entries = config["benchmark"]["model"]["grid"]
    assert [entry["class_path"] for entry in entries] == ["ADTR", "Padim", "Patchcore"]
    # anomalib's result collection needs the same init_args keys in every entry.
    assert len({tuple(sorted(entry["init_args"])) for entry in entries}) == 1
    assert config["benchmark"]["data"]["init_args"]["category"]["grid"] == list(MVTEC_CATEGORIES)

    # The same file, offline and tiny: Lite0 (packaged weights) for ADTR, untrained ResNet-18 for the others.
    offline = {"ADTR": {"backbone": "tf_efficientnet_lite0"}, "Padim": {"backbone": "resnet18", "pre_trained": False}}
    offline["Patchcore"] = offline["Padim"]
    for entry in entries:
        entry["init_args"].update(offline[entry["class_path"]])
    config["benchmark"]["data"]["init_args"].update(
        root=str(tiny_textures_root.parent),
        category={"grid": [tiny_textures_root.name]},
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
    )
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PL_TRAINER_MAX_EPOCHS", "1")  # ADTR's epochs; the pipeline passes no trainer settings
    # The pipeline sends every logger to its own log file; give the other tests theirs back afterwards.
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)]
    handlers = [(logger, list(logger.handlers)) for logger in loggers]
    try:
        Benchmark().run(Namespace(config=str(path)))
    finally:
        for logger, kept in handlers:
            logger.handlers = kept
        logging.captureWarnings(capture=False)

    results = list(Path("runs/benchmark").glob("*/results.csv"))
    assert len(results) == 1
    table = pd.read_csv(results[0])
    assert list(table["model.class_path"]) == ["ADTR", "Padim", "Patchcore"]
    assert table["image_AUROC"].between(0, 1).all()
    assert table["pixel_AUROC"].between(0, 1).all()


def test_recommended_and_peers_configs_plan_adtr_fast_and_the_peers_on_full_data(bsdata_root, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    recommended = _plan("--config", str(CONFIGS / "recommended.yaml"), "--data", json.dumps([str(bsdata_root)]))
    assert [job.model.label for job in recommended] == ["ADTR", "PaDiM"]  # PatchCore: peers.yaml
    offline = yaml.safe_load((REPO / "configs" / "adtr" / "lite0_offline.yaml").read_text())
    # The development yardstick trains ADTR as the recommended config does: the same recipe and optimiser steps.
    development = _plan("--config", str(CONFIGS / "development.yaml"), "--data", json.dumps([str(bsdata_root)]))
    assert development[0].model.init_args == {"recipe": offline["model"]["init_args"]["recipe"]}
    assert development[0].model.steps == offline["trainer"]["max_steps"]
    assert [job.model.label for job in development] == ["ADTR", "PaDiM", "PatchCore"] * 2  # two seeds
    peers = _plan("--config", str(CONFIGS / "peers.yaml"), "--data", json.dumps(["builtin:brick", str(bsdata_root)]))
    assert sorted({job.data.label for job in peers}) == ["brick", "bsdata_pitting"]
    assert {job.model.label for job in peers} == {"PaDiM", "PatchCore"}
    config = yaml.safe_load((CONFIGS / "recommended.yaml").read_text())
    assert "max_train_images" not in config  # full splits


def test_adtr_plus_bsdata_config_plans_the_control_and_both_adtr_plus_arms_from_adtr(bsdata_root, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    settings = parser().parse_args(["--config", str(CONFIGS / "adtr_plus_bsdata.yaml")])
    settings.data = [str(bsdata_root)]
    jobs = plan(settings)
    assert settings.move_from_test == 10
    labels = ["ADTR", "ADTR (continued)", "ADTR+ (labelled)", "ADTR+ (confetti)", "PaDiM"]
    assert [job.model.label for job in jobs] == labels * 2
    for job in jobs:
        started = job.model.label in labels[1:4]
        assert job.parent == (f"ADTR on bsdata_pitting, seed {job.seed}" if started else None)
    trains_on_moved = [job.model.label for job in jobs[:5] if (job.model.train_anomalies or {}).get("train_on_moved")]
    assert trains_on_moved == ["ADTR+ (labelled)"]
    recipes = {job.model.init_args.get("recipe") for job in jobs if job.model.key in {"adtr", "adtr_plus"}}
    assert recipes == {"fast_stride8_local"}  # the recommended recipe everywhere, so ADTR+ can start from ADTR


def test_moving_test_images_changes_every_jobs_fingerprint_so_resume_runs_them_again() -> None:
    without = [job.fingerprint for job in _plan("--models", "[adtr, padim]")]
    assert [job.fingerprint for job in _plan("--models", "[adtr, padim]", "--move_from_test", "0")] == without
    moved = [job.fingerprint for job in _plan("--models", "[adtr, padim]", "--move_from_test", "2")]
    assert not set(moved) & set(without)
    with pytest.raises(ValueError, match="move_from_test must be a number of images >= 0"):
        _plan("--move_from_test", "-1")


def test_steps_replace_epochs_for_models_that_set_neither_and_change_only_their_fingerprints() -> None:
    assert [job.model.steps for job in _plan("--models", "[adtr, padim]")] == [DEFAULT_STEPS, None]
    without = _plan("--models", "[adtr, padim]", "--epochs", "10")
    assert [job.model.steps for job in without] == [None, None]
    assert "steps" not in without[0].model.identity()  # benchmarks from before step budgets keep their fingerprints
    stepped = _plan("--models", "[adtr, {name: padim, epochs: 1}]", "--steps", "200")
    assert [job.model.steps for job in stepped] == [200, None]  # an entry's own epochs win over --steps
    assert stepped[0].fingerprint != without[0].fingerprint
    assert (
        stepped[1].fingerprint != without[1].fingerprint or stepped[1].model.identity() == without[1].model.identity()
    )


def test_global_epochs_or_steps_set_the_default_models_length() -> None:
    """Without options ADTR trains the recommended step budget; --epochs or --steps replace it."""
    assert [(job.model.label, job.model.steps) for job in _plan()] == [
        ("ADTR", DEFAULT_STEPS),
        ("PaDiM", None),
        ("PatchCore", None),
    ]
    adtr = _plan("--epochs", "3")[0].model
    assert (adtr.epochs, adtr.steps) == (3, None)
    assert _plan("--steps", "40")[0].model.steps == 40
    with pytest.raises(ValueError, match="--epochs or --steps, not both"):
        _plan("--epochs", "3", "--steps", "40")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("{name: adtr, epochs: 2, steps: 100}", "set epochs or steps, not both"),
        ("{name: adtr, steps: 0}", "steps must be a positive integer"),
        ("{name: adtr, steps: 1.5}", "steps must be a positive integer"),
    ],
)
def test_a_bad_step_budget_is_refused_with_the_model_entry_named(entry: str, match: str) -> None:
    with pytest.raises(ValueError, match=rf"models\[0\]: {match}"):
        _plan("--models", f"[{entry}]")
