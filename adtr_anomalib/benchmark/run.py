"""Running the jobs: fit and test with anomalib's Engine, measure what each model costs, record every result.

Each finished job is appended to ``<output>/jobs.jsonl`` at once, so a stopped benchmark resumes where it
stopped (``--resume``); a job whose settings changed since is run again. A failing job is recorded as failed,
the others still run, and the command then exits non-zero naming it.
"""

from __future__ import annotations

import gc
import io
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.trainer.states import TrainerFn

from adtr_anomalib.benchmark.measure import fastest_seconds, heap_setting_for, machine, peak_memory, timed
from adtr_anomalib.benchmark.models import METRICS, build_model
from adtr_anomalib.benchmark.plan import Job, plan, with_training_anomalies
from adtr_anomalib.benchmark.report import (
    ROW_COLUMNS,
    plot_accuracy_vs_throughput,
    summarise,
    summary_table,
    unused_path,
    write_csv,
)
from adtr_anomalib.data import subsample_splits
from adtr_anomalib.models.adtr.components.training import step_budget

RESULTS_LOG = "jobs.jsonl"


class ResultLog:
    """``<output>/jobs.jsonl``: one JSON line per finished job, the latest line of a job counting.

    Raises:
        FileExistsError: The folder holds an earlier benchmark and ``resume`` is off (never mixed silently).
    """

    def __init__(self, folder: Path, resume: bool) -> None:
        self.path = folder / RESULTS_LOG
        if self.path.exists() and not resume:
            msg = f"'{self.path}' holds an earlier benchmark: pass --resume to continue it, or choose another --output."
            raise FileExistsError(msg)
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def finished(self, job: Job) -> dict[str, Any] | None:
        """The earlier successful result of ``job`` with the same settings, if any."""
        record = self.records.get(job.key)
        ok = record is not None and record["status"] == "ok" and record["fingerprint"] == job.fingerprint
        return record if ok else None

    def add(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.records[record["key"]] = record


class Progress:
    """``[i/N] job: ...`` lines on stderr, with the elapsed time and an estimate of the time left."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = jobs
        self.began = time.perf_counter()
        self.durations: dict[str, list[float]] = {}

    def say(self, index: int, text: str) -> None:
        job = self.jobs[index]
        print(f"[{index + 1}/{len(self.jobs)}] {job.key}: {text}", file=sys.stderr, flush=True)

    def start(self, index: int) -> None:
        self.say(index, f"started; elapsed {_clock(time.perf_counter() - self.began)}, ETA {self._eta(index)}")

    def done(self, index: int, seconds: float) -> None:
        self.durations.setdefault(self.jobs[index].model.label, []).append(seconds)

    def _eta(self, index: int) -> str:
        """Jobs left times the mean duration of finished jobs of the same model (of all models if none yet)."""
        everything = [s for seconds in self.durations.values() for s in seconds]
        if not everything:
            return "unknown until a job finishes"
        overall = sum(everything) / len(everything)
        left = 0.0
        for job in self.jobs[index:]:
            same = self.durations.get(job.model.label)
            left += sum(same) / len(same) if same else overall
        return _clock(left)

    def epochs(self, index: int) -> Callback:
        """A Lightning callback that reports each finished training epoch of a multi-epoch job."""
        return _EpochProgress(lambda text: self.say(index, text))


class _EpochProgress(Callback):
    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.began = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        elapsed = _clock(time.perf_counter() - self.began)
        if trainer.max_steps > 0:
            self.say(f"step {trainer.global_step}/{trainer.max_steps} ({elapsed})")
        elif (trainer.max_epochs or 1) > 1:
            self.say(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({elapsed})")


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def run_benchmark(settings: Namespace, config: str) -> int:
    """Run every job not already finished; write the reports; 0 when all succeeded, else 1 (failures listed).

    ``config`` (the settings as YAML) is saved next to the results, so a run can be repeated exactly.
    """
    jobs = plan(settings)
    heap_setting_for(job.model.key for job in jobs)  # PatchCore fragments the heap on small machines
    log = ResultLog(settings.output, settings.resume)
    unused_path(settings.output, "config.yaml").write_text(config, encoding="utf-8")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    models, datasets = len({job.model.label for job in jobs}), len({job.data.label for job in jobs})
    print(
        f"Benchmark: {len(jobs)} jobs ({models} models x {datasets} datasets x {len(settings.seeds)} seeds) "
        f"in {settings.output}",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(jobs)
    records: dict[str, dict[str, Any]] = {}
    for index, job in enumerate(jobs):
        earlier = log.finished(job)
        if earlier is not None:
            records[job.key] = earlier
            progress.say(index, "finished in an earlier run, kept")
            continue
        if job.key in log.records and log.records[job.key]["status"] == "ok":
            progress.say(index, "settings changed since the earlier run: running it again")
        progress.start(index)
        began = time.perf_counter()
        record: dict[str, Any] = {
            "key": job.key,
            "fingerprint": job.fingerprint,
            "dataset": job.data.label,
            "model": job.model.label,
            "seed": job.seed,
            "epochs": job.model.epochs,
        }
        try:
            result = run_job(job, settings, _start_checkpoint(job, records), progress.epochs(index))
            record.update(status="ok", **result)
        except Exception as error:  # noqa: BLE001 - one failed job must not stop the others; it is reported below
            traceback.print_exc()
            record.update(status="failed", error=" ".join(f"{type(error).__name__}: {error}".split()))
        gc.collect()
        record.update(job_s=time.perf_counter() - began, finished=datetime.now().isoformat(timespec="seconds"))
        log.add(record)
        records[job.key] = record
        progress.done(index, record["job_s"])
        progress.say(index, _outcome(record))
    return _report([records[job.key] for job in jobs], settings.output, settings)


def _start_checkpoint(job: Job, records: dict[str, dict[str, Any]]) -> str | None:
    """The checkpoint of the ADTR job this ADTR or ADTR+ job starts from (same dataset and seed)."""
    if job.parent is None:
        return None
    parent = records.get(job.parent)
    if parent is None or parent["status"] != "ok":
        msg = f"it starts from the checkpoint of '{job.parent}', which failed."
        raise RuntimeError(msg)
    return parent["checkpoint"]


def _outcome(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"FAILED after {_clock(record['job_s'])}: {record['error']}"
    metrics = ", ".join(f"{key} {record[key]:.3f}" for key in METRICS if not math.isnan(record[key]))
    return f"done in {_clock(record['job_s'])}: {metrics}"


def _training_length(model: Any, spec: Any) -> dict[str, Any]:
    """Trainer arguments for how long ``model`` trains: its own fixed pass (PaDiM, PatchCore), else the spec's
    optimiser steps or epochs. Validation only feeds the post-processor's statistics: once, after training."""
    fixed = model.trainer_arguments.get("max_epochs")
    if fixed is None and spec.steps is not None:
        return step_budget(spec.steps)
    epochs = int(fixed or spec.epochs)
    return {"max_epochs": epochs, "check_val_every_n_epoch": epochs}


def run_job(job: Job, settings: Namespace, start_checkpoint: str | None, callback: Callback) -> dict[str, Any]:
    """Fit and test one model on one dataset with one seed; return its metrics, timings and costs."""
    seed_everything(job.seed, workers=True)
    datamodule = job.data.build(job.seed, settings.batch_size, settings.num_workers)
    datamodule = with_training_anomalies(datamodule, job.model.train_anomalies, settings.move_from_test, job.seed)
    if settings.max_train_images or settings.max_test_images_per_label:
        # Set up here so the subsets can be drawn; Lightning's own setup calls then keep them.
        datamodule.prepare_data()
        datamodule.setup(TrainerFn.FITTING)
        subsample_splits(datamodule, settings.max_train_images, settings.max_test_images_per_label, seed=job.seed)
    options = dict(job.model.init_args)
    if start_checkpoint is not None and job.model.key == "adtr_plus":
        options["adtr_checkpoint"] = start_checkpoint
    model = build_model(job.model.key, settings.backbone, settings.image_size, settings.weights, **options)
    if start_checkpoint is not None and job.model.key == "adtr":  # trained further, fresh optimiser and schedule
        model.load_network_weights(start_checkpoint, argument="start_from")
    engine = Engine(
        **_training_length(model, job.model),
        default_root_dir=settings.output / "jobs" / re.sub(r"[^\w.-]+", "_", job.key),
        logger=False,
        deterministic="warn",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **settings.trainer,
    )
    with peak_memory() as memory:
        _, fit_seconds = timed(lambda: engine.fit(model=model, datamodule=datamodule))
        results, test_seconds = timed(lambda: engine.test(model=model, datamodule=datamodule, verbose=False))
        throughput = measure_throughput(model, settings.image_size, settings.throughput_batch_size)
    metrics = results[0]
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    return {
        "epochs": engine.trainer.current_epoch,
        "steps": engine.trainer.global_step,
        **{key: float(metrics.get(key, math.nan)) for key in METRICS},
        "fit_s": fit_seconds,
        "test_s": test_seconds,
        "throughput_img_s": throughput,
        "peak_RSS_MB": memory.peak_mb,
        "params_M": sum(p.numel() for p in model.model.parameters()) / 1e6,
        "checkpoint_MB": weights.tell() / 1e6,
        "checkpoint": str(Path(engine.trainer.checkpoint_callback.best_model_path).resolve()),
    }


@torch.inference_mode()
def measure_throughput(model: AnomalibModule, image_size: int, batch_size: int = 16) -> float:
    """Images per second of the whole inference path (pre-process, network, post-process) in eager mode.

    Every model gets the same fixed random batch, on the current device with torch's current thread count, timed
    by :func:`~adtr_anomalib.benchmark.measure.fastest_seconds`.
    """
    model.eval()
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images = images.to(model.device)
    return batch_size / fastest_seconds(lambda: model(images))


def _report(records: list[dict[str, Any]], folder: Path, settings: Namespace) -> int:
    """Write the CSVs, the Markdown table and the plot (never replacing a file); print the table and failures."""
    rows = [{column: record.get(column, "") for column in ROW_COLUMNS} for record in records]
    summaries = summarise(rows)
    stamp = datetime.now().isoformat(timespec="minutes")
    about = (
        f"{stamp}, {machine()}. Backbone {settings.backbone} with {settings.weights or 'its ImageNet weights'} for "
        f"every model, {settings.image_size}x{settings.image_size}, throughput at batch "
        f"{settings.throughput_batch_size}."
    )
    failed = [record for record in records if record["status"] != "ok"]
    table = summary_table(summaries)
    text = f"{table}\n\n{about}\n"
    if failed:
        text += "\nFailed jobs:\n" + "".join(f"- {record['key']}: {record['error']}\n" for record in failed)
    paths = [
        write_csv(rows, folder, "results.csv"),
        write_csv(summaries, folder, "summary.csv"),
        unused_path(folder, "results.md"),
    ]
    paths[-1].write_text(text, encoding="utf-8")
    paths.append(
        plot_accuracy_vs_throughput(
            summaries, unused_path(folder, "accuracy_vs_throughput.png"), stamp, settings.throughput_batch_size
        )
    )
    print(f"\n{text}\nWritten: {', '.join(str(path) for path in paths)}", flush=True)
    if failed:
        names = "".join(f"\n  {record['key']}: {record['error']}" for record in failed)
        print(f"adtr-anomalib benchmark: {len(failed)} of {len(records)} jobs FAILED:{names}", file=sys.stderr)
        return 1
    return 0
