"""From a benchmark configuration to its jobs: every model on every dataset with every seed.

The configuration is read with jsonargparse (a YAML file via ``--config``, every key also a command-line
option). Datasets and models are checked here, before the first job runs, so a typo fails in seconds rather
than after hours of training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomalib.data import AnomalibDataModule
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from adtr_anomalib.benchmark.models import DISPLAY_NAMES, check_model_options, model_key
from adtr_anomalib.data import (
    HELD_OUT_VALIDATION,
    TEXTURE_CATEGORIES,
    WithAnomalies,
    default_dataset_root,
    make_texture_dataset,
    mvtec_layout_folder,
)
from adtr_anomalib.models.adtr.components.settings import DEFAULT_RECIPE, DEFAULT_STEPS

BUILTIN = "builtin:"
MODEL_FIELDS = ("name", "label", "epochs", "steps", "init_args", "start_from", "train_anomalies")
# Engine arguments every job gets from the benchmark itself (see run.run_job).
BENCHMARK_TRAINER_ARGUMENTS = (
    "max_epochs",
    "max_steps",
    "val_check_interval",
    "check_val_every_n_epoch",
    "default_root_dir",
    "logger",
    "deterministic",
    "enable_progress_bar",
    "enable_model_summary",
    "callbacks",
)
# Models trained by gradient steps; the others fit in one pass over the training images.
TRAINED = ("adtr", "adtr_plus")
# The epochs recorded for a model that sets none (the fingerprints of earlier results hold it).
LEGACY_EPOCHS = 10
DEFAULT_MODELS: list[str | dict[str, Any]] = [
    {"name": "adtr", "init_args": {"recipe": DEFAULT_RECIPE}},
    "padim",
    "patchcore",
]


def parser() -> ArgumentParser:
    """The ``adtr-anomalib benchmark`` options; each is also a key of the ``--config`` YAML file.

    Returns:
        The parser; it raises on bad options instead of exiting.
    """
    parser = ArgumentParser(
        prog="adtr-anomalib benchmark",
        description="Run ADTR, ADTR+, PaDiM and PatchCore side by side on the same data, split, backbone weights "
        "and metrics; write CSV, Markdown and an accuracy/throughput plot.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_argument(
        "--models",
        type=list[str | dict[str, Any]],
        default=DEFAULT_MODELS,
        help="models: a name (adtr, adtr_plus, padim, patchcore) or {name, label, epochs, steps, init_args, "
        "start_from, train_anomalies}",
    )
    parser.add_argument(
        "--data",
        type=list[str | dict[str, Any]],
        default=[f"{BUILTIN}brick"],
        help="datasets: 'builtin:<brick|grass|gravel>', an MVTec-layout folder, or an anomalib datamodule as "
        "{class_path, init_args} ({grid: [...]} values make one dataset each)",
    )
    parser.add_argument("--seeds", type=list[int], default=[0], help="one job per seed; several give mean ± std")
    parser.add_argument(
        "--epochs",
        type=int | None,
        default=None,
        help="training epochs of models that set neither epochs nor steps",
    )
    parser.add_argument(
        "--steps",
        type=int | None,
        default=None,
        help=f"optimiser steps of models that set neither epochs nor steps (instead of --epochs); without either, "
        f"ADTR and ADTR+ train {DEFAULT_STEPS} steps",
    )
    parser.add_argument("--backbone", type=str, default="tf_efficientnet_lite0", help="every model's backbone")
    parser.add_argument("--weights", type=str | None, default=None, help="backbone weights file for every model")
    parser.add_argument("--image_size", type=int, default=256, help="square input size of every model")
    parser.add_argument("--batch_size", type=int, default=16, help="train/eval batch size where the data set none")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loader workers where the data set none")
    parser.add_argument("--max_train_images", type=int | None, default=None, help="seeded subset of each train set")
    parser.add_argument(
        "--max_test_images_per_label",
        type=int | None,
        default=None,
        help="seeded subset of each test set: at most this many normal and this many anomalous images",
    )
    parser.add_argument(
        "--move_from_test",
        type=int,
        default=0,
        help="anomalous test images per defect type moved out of every test set (seeded by the job's seed) for "
        "every model alike; adtr_plus models with train_anomalies.train_on_moved: true train on them",
    )
    parser.add_argument("--throughput_batch_size", type=int, default=16, help="batch size of the speed test")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for every job (0: torch's default)")
    parser.add_argument("--trainer", type=dict[str, Any], default={}, help="extra Lightning Trainer arguments")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark"), help="results folder")
    parser.add_argument("--resume", action="store_true", help="continue the benchmark in --output")
    return parser


@dataclass(frozen=True)
class ModelSpec:
    """One model of the benchmark; it runs on every dataset with every seed."""

    key: str
    label: str
    epochs: int
    init_args: dict[str, Any] = field(default_factory=dict)
    start_from: str | None = None
    train_anomalies: dict[str, Any] | None = None
    # Optimiser steps instead of epochs (trained models only; PaDiM and PatchCore fix their single pass).
    steps: int | None = None

    def identity(self) -> dict[str, Any]:
        """What a job's fingerprint records of the model: ``steps`` only when set, so that benchmarks run before
        step budgets existed keep their fingerprints (and ``--resume`` keeps their finished jobs)."""
        fields = asdict(self)
        if fields["steps"] is None:
            del fields["steps"]
        return fields


@dataclass(frozen=True)
class DataSpec:
    """One dataset: ``builtin:<category>``, an MVTec-layout folder, or a ``{class_path, init_args}`` datamodule."""

    label: str
    entry: str | dict[str, Any]

    def build(self, seed: int, batch_size: int, num_workers: int) -> AnomalibDataModule:
        """A fresh datamodule; batch sizes, workers and split seed fill in what the entry leaves out.

        Args:
            seed: Seed of the datamodule's splits.
            batch_size: Train and eval batch size, unless a datamodule entry sets them.
            num_workers: Data-loader workers, unless a datamodule entry sets them.

        Returns:
            The datamodule, not set up yet (a built-in dataset is generated first if missing).
        """
        loader = {"train_batch_size": batch_size, "eval_batch_size": batch_size, "num_workers": num_workers}
        if isinstance(self.entry, str):
            if self.entry.startswith(BUILTIN):
                root = make_texture_dataset(default_dataset_root(), self.entry.removeprefix(BUILTIN))
            else:
                root = Path(self.entry)
            # Thresholds and normalisation from held-back training images, never from the test images.
            return mvtec_layout_folder(root, seed=seed, **loader, **HELD_OUT_VALIDATION)
        parser, namespace = _parse_datamodule(self.entry)
        given = self.entry.get("init_args", {})
        for name, value in {**loader, "seed": seed}.items():
            if name in namespace.data.init_args and name not in given:
                namespace.data.init_args[name] = value
        return parser.instantiate_classes(namespace).data


@dataclass(frozen=True)
class Job:
    """One model on one dataset with one seed: one row of the results."""

    model: ModelSpec
    data: DataSpec
    seed: int
    fingerprint: str
    parent: str | None = None  # key of the ADTR job this ADTR or ADTR+ job starts from

    @property
    def key(self) -> str:
        """The job's name, as :func:`job_key` makes it.

        Returns:
            ``"<model> on <dataset>, seed <seed>"`` with the model and dataset labels.
        """
        return job_key(self.data.label, self.model.label, self.seed)


def job_key(dataset: str, model: str, seed: int) -> str:
    """How jobs are named in progress lines, errors and the results file.

    Args:
        dataset: Dataset label.
        model: Model label.
        seed: The job's seed.

    Returns:
        ``"<model> on <dataset>, seed <seed>"``.
    """
    return f"{model} on {dataset}, seed {seed}"


def plan(settings: Namespace) -> list[Job]:
    """Every (dataset, seed, model) job in run order; raises ``ValueError`` naming the bad entry.

    Args:
        settings: Options parsed by :func:`parser`.

    Returns:
        The jobs; an ADTR+ job with ``start_from`` comes after the ADTR job it starts from.

    Raises:
        ValueError: If an entry of ``models``, ``data``, ``seeds`` or ``trainer`` is unusable.
    """
    if not settings.models or not settings.data or not settings.seeds:
        msg = "models, data and seeds must each list at least one entry."
        raise ValueError(msg)
    if len(set(settings.seeds)) != len(settings.seeds):
        msg = f"seeds has repeats: {settings.seeds}."
        raise ValueError(msg)
    taken = sorted(set(settings.trainer) & set(BENCHMARK_TRAINER_ARGUMENTS))
    if taken:
        msg = f"trainer: {taken} are set by the benchmark (per model: 'epochs' or 'steps'); remove them."
        raise ValueError(msg)
    if settings.epochs is not None and settings.steps is not None:
        msg = "give --epochs or --steps, not both."
        raise ValueError(msg)
    models = _model_specs(settings.models, settings.epochs, settings.steps)
    if settings.move_from_test < 0:
        msg = f"move_from_test must be a number of images >= 0, got {settings.move_from_test}."
        raise ValueError(msg)
    for model in models:
        if (model.train_anomalies or {}).get("train_on_moved") and not settings.move_from_test:
            msg = f"{model.label}: train_anomalies.train_on_moved needs move_from_test > 0 (images to train on)."
            raise ValueError(msg)
    datasets = _unique([spec for index, entry in enumerate(settings.data) for spec in _data_specs(entry, index)])
    shared = {
        key: settings[key]
        for key in (
            "backbone",
            "weights",
            "image_size",
            "batch_size",
            "num_workers",
            "max_train_images",
            "max_test_images_per_label",
            "throughput_batch_size",
        )
    }
    shared["trainer"] = dict(settings.trainer)
    if settings.move_from_test:  # only when set: fingerprints of benchmarks without it stay those of earlier versions
        shared["move_from_test"] = settings.move_from_test
    jobs: list[Job] = []
    for data in datasets:
        for seed in settings.seeds:
            fingerprints: dict[str, str] = {}
            for model in models:
                parent = job_key(data.label, model.start_from, seed) if model.start_from else None
                content = {"model": model.identity(), "data": data.entry, "seed": seed, "shared": shared}
                content["parent"] = fingerprints.get(model.start_from or "")
                fingerprint = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
                fingerprints[model.label] = fingerprint[:16]
                jobs.append(Job(model, data, seed, fingerprint[:16], parent))
    return jobs


def _model_specs(
    entries: Sequence[str | dict[str, Any]], default_epochs: int | None = None, default_steps: int | None = None
) -> list[ModelSpec]:
    """The models' specs; an entry's own length wins, then ``--steps``, then ``--epochs``, and without any the trained
    models get the recommended step budget (PaDiM and PatchCore record 10 epochs: they fit in one pass anyway)."""
    specs: list[ModelSpec] = []
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        unknown = sorted(set(entry) - set(MODEL_FIELDS))
        if unknown or "name" not in entry:
            msg = f"{where}: {'unknown keys ' + str(unknown) if unknown else 'no name'}; an entry takes {MODEL_FIELDS}."
            raise ValueError(msg)
        if not isinstance(entry.get("init_args") or {}, dict):
            msg = f"{where}: init_args must be a mapping of the model's arguments."
            raise ValueError(msg)
        try:
            key = model_key(str(entry["name"]))
            check_model_options(str(entry["name"]), dict(entry.get("init_args") or {}))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        steps = entry.get("steps", None if entry.get("epochs") is not None else default_steps)
        if steps is None and entry.get("epochs") is None and default_epochs is None and key in TRAINED:
            steps = DEFAULT_STEPS
        epochs = entry["epochs"] if entry.get("epochs") is not None else (default_epochs or LEGACY_EPOCHS)
        for what, value in (("epochs", epochs), ("steps", steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                msg = f"{where}: {what} must be a positive integer, got {value!r}."
                raise ValueError(msg)
        if entry.get("epochs") is not None and entry.get("steps") is not None:
            msg = f"{where}: set epochs or steps, not both (steps: optimiser steps whatever the data set's size)."
            raise ValueError(msg)
        spec = ModelSpec(
            key=key,
            label=str(entry.get("label") or DISPLAY_NAMES[key]),
            epochs=epochs,
            steps=steps,
            init_args=dict(entry.get("init_args") or {}),
            start_from=entry.get("start_from"),
            train_anomalies=entry.get("train_anomalies"),
        )
        _check_adtr_plus(spec, specs, where)
        specs.append(spec)
    _unique(specs)
    return specs


def _check_adtr_plus(spec: ModelSpec, earlier: list[ModelSpec], where: str) -> None:
    """``start_from`` (ADTR and ADTR+) and ``train_anomalies`` (ADTR+) must make sense before anything runs."""
    if spec.start_from is not None and spec.key not in {"adtr", "adtr_plus"}:
        msg = f"{where} ({spec.label}): start_from is for adtr (trained further) and adtr_plus only."
        raise ValueError(msg)
    if spec.train_anomalies is not None and spec.key != "adtr_plus":
        msg = f"{where} ({spec.label}): train_anomalies is for adtr_plus only (ADTR trains on normal images)."
        raise ValueError(msg)
    if spec.start_from is not None:
        starts = [m for m in earlier if m.label == spec.start_from and m.key == "adtr"]
        if not starts:
            msg = (
                f"{where} ({spec.label}): start_from={spec.start_from!r} must be the label of an adtr model listed "
                f"before it; earlier labels: {[m.label for m in earlier]}."
            )
            raise ValueError(msg)
        if "adtr_checkpoint" in spec.init_args:
            msg = f"{where} ({spec.label}): give start_from or init_args.adtr_checkpoint, not both."
            raise ValueError(msg)
    if spec.train_anomalies is not None:
        if not isinstance(spec.train_anomalies, dict):
            msg = f"{where} ({spec.label}): train_anomalies must be a mapping of WithAnomalies arguments."
            raise ValueError(msg)
        try:
            _train_anomalies_parser().parse_object(spec.train_anomalies)
        except ArgumentError as error:
            raise ValueError(f"{where} ({spec.label}) train_anomalies: {error}") from None


def _train_anomalies_parser() -> ArgumentParser:
    """The ``train_anomalies`` entry: :class:`WithAnomalies` arguments, less those the benchmark sets for every model
    (the wrapped datamodule, the images moved out of test and the seed of that move): a model that moved test images
    on its own would be tested on fewer images than the others."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(WithAnomalies, skip={"datamodule", "move_from_test", "seed"})
    return parser


def with_training_anomalies(
    datamodule: AnomalibDataModule, train_anomalies: dict[str, Any] | None, move_from_test: int, seed: int
) -> AnomalibDataModule:
    """``datamodule`` wrapped in :class:`WithAnomalies`: the benchmark's moved test images, the model's anomalies.

    Args:
        datamodule: The job's datamodule.
        train_anomalies: The model's ``train_anomalies`` entry (:class:`WithAnomalies` arguments, e.g. confetti
            noise), or ``None``. Unlike ``WithAnomalies``, a model trains on the moved images only with
            ``train_on_moved: true``: the others are tested on the same reduced test set and never see them.
        move_from_test: Anomalous test images per defect type moved out of test (and validation), for every model
            alike.
        seed: Seed of the move: the job's, so every model of a seed gets the same test set.

    Returns:
        The wrapping datamodule, or ``datamodule`` itself when there is nothing to add or move.
    """
    if train_anomalies is None and not move_from_test:
        return datamodule
    parser = _train_anomalies_parser()
    options = parser.instantiate_classes(parser.parse_object({"train_on_moved": False, **(train_anomalies or {})}))
    return WithAnomalies(datamodule, move_from_test=move_from_test, seed=seed, **dict(options.items()))


def _data_specs(entry: str | dict[str, Any], index: int) -> Iterator[DataSpec]:
    where = f"data[{index}]"
    if isinstance(entry, str):
        if entry.startswith(BUILTIN):
            category = entry.removeprefix(BUILTIN)
            if category not in TEXTURE_CATEGORIES:
                msg = f"{where}: {entry!r}: the built-in categories are {list(TEXTURE_CATEGORIES)}."
                raise ValueError(msg)
            yield DataSpec(category, entry)
            return
        try:
            mvtec_layout_folder(entry)  # checks the layout now, not when the job starts
        except FileNotFoundError as error:
            raise ValueError(f"{where}: {error}") from None
        yield DataSpec(Path(entry).resolve().name, entry)
        return
    entry = dict(entry)
    label = entry.pop("label", None)
    for expanded in get_iterator_from_grid_dict(entry):  # anomalib's `grid` syntax: one dataset per value
        try:
            _parse_datamodule(expanded)
        except ArgumentError as error:
            raise ValueError(f"{where}: {error}") from None
        init_args = expanded.get("init_args", {})
        name = label or init_args.get("name") or str(expanded["class_path"]).rsplit(".", 1)[-1]
        category = init_args.get("category")
        yield DataSpec(f"{name}/{category}" if category else str(name), expanded)


def _parse_datamodule(entry: dict[str, Any]) -> tuple[ArgumentParser, Namespace]:
    """jsonargparse resolves ``class_path`` (bare anomalib names too) and checks ``init_args`` names and types."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=AnomalibDataModule)
    return parser, parser.parse_object({"data": entry})


def _unique(specs: list[Any]) -> list[Any]:
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        msg = f"Labels must be unique, repeated: {repeated}; give the entries a 'label'."
        raise ValueError(msg)
    return specs
