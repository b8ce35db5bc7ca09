"""Benchmark results as CSV, a Markdown table (mean ± std over seeds) and an accuracy/throughput plot.

No file is ever replaced: when ``results.csv`` exists, ``results_1.csv`` is written, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from adtr_anomalib.benchmark.models import METRICS

COSTS = ("fit_s", "test_s", "throughput_img_s", "peak_RSS_MB", "params_M", "checkpoint_MB")
NUMERIC = (*METRICS, *COSTS)
ROW_COLUMNS = ("dataset", "model", "seed", "status", "epochs", "steps", *NUMERIC, "error")


def seed_spread(values: Sequence[float]) -> float:
    """The spread of one metric over seeds in every table: the sample standard deviation (``ddof=1``), NaN for one.

    Args:
        values: The metric of each seed.

    Returns:
        The sample standard deviation.
    """
    return float(pd.Series(values, dtype="float64").std(ddof=1)) if len(values) > 1 else math.nan


def unused_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name_1``, ``name_2``, ... before the suffix: an earlier file is never replaced.

    Args:
        folder: Destination folder; created if missing.
        name: File name wanted.

    Returns:
        A path in ``folder`` that does not exist yet.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = Path(name).stem, Path(name).suffix
    path, n = folder / name, 1
    while path.exists():
        path, n = folder / f"{stem}_{n}{suffix}", n + 1
    return path


def format_value(column: str, value: Any) -> str:
    """Metrics with three decimals, seconds and MB with none, images/s with one, millions with two.

    Args:
        column: Column name; its suffix picks the decimals.
        value: Cell value; strings and integers are kept as they are, ``None`` and NaN become ``n/a``.

    Returns:
        The cell text.
    """
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if column.endswith("_img_s"):
        decimals = 1
    elif column.endswith(("_s", "_MB")):
        decimals = 0
    elif column.endswith("_M"):
        decimals = 2
    else:
        decimals = 3
    return f"{value:.{decimals}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a Markdown table (columns from the first row), numbers formatted by :func:`format_value`.

    Args:
        rows: Table rows, at least one.

    Returns:
        The table in GitHub-flavoured Markdown.
    """
    frame = pd.DataFrame(list(rows), columns=list(rows[0]))
    text = frame.apply(lambda column: column.map(lambda value: format_value(str(column.name), value)))
    return text.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def write_csv(rows: Sequence[dict[str, Any]], folder: Path, name: str = "results.csv") -> Path:
    """Write ``rows`` to ``folder/name`` (or ``name_<n>`` if that exists: earlier results are kept).

    Args:
        rows: Result rows, at least one; the first row's keys are the columns.
        folder: Results folder; created if missing.
        name: File name wanted.

    Returns:
        The path written.
    """
    path = unused_path(folder, name)
    pd.DataFrame(list(rows), columns=list(rows[0])).to_csv(path, index=False, mode="x")
    return path


def append_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Add ``rows`` to the CSV at ``path``, keeping every earlier row (a log of runs, unlike :func:`write_csv`).

    Columns new to the file are added, empty in the earlier rows; no earlier value changes.

    Args:
        rows: Result rows, at least one.
        path: CSV file; created (with its folder) if missing.

    Returns:
        ``path``.
    """
    table = pd.DataFrame(list(rows))
    if path.exists():
        # Earlier rows are read as text, so they are written back exactly as they were.
        table = pd.concat([pd.read_csv(path, dtype=str, keep_default_na=False), table], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per dataset and model: the mean over its successful seeds, and their sample std (n - 1).

    A dataset/model whose every seed failed still gets a row (values NaN, ``failed_seeds`` set): a failure is
    never a missing row.

    Args:
        rows: One result row per job (``dataset``, ``model``, ``seed``, ``status``, ``epochs``, metrics and costs).

    Returns:
        One summary per dataset and model, in first-seen order, with ``<column>_std`` beside each number.
    """
    frame = pd.DataFrame(list(rows))
    frame[list(NUMERIC)] = frame[list(NUMERIC)].apply(pd.to_numeric, errors="coerce")
    summaries = []
    for (dataset, model), group in frame.groupby(["dataset", "model"], sort=False):
        ok = group[group["status"] == "ok"]
        numbers = ok[list(NUMERIC)]
        # Benchmarks from before step budgets have no steps column.
        steps = pd.to_numeric((ok if len(ok) else group).get("steps", pd.Series([math.nan])), errors="coerce").iloc[0]
        summary: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "seeds": ", ".join(str(seed) for seed in ok["seed"]) or "none",
            "failed_seeds": ", ".join(str(seed) for seed in group.loc[group["status"] != "ok", "seed"]),
            "epochs": (ok if len(ok) else group)["epochs"].iloc[0],
            "steps": math.nan if pd.isna(steps) else int(steps),
        }
        for column in NUMERIC:
            summary[column] = float(numbers[column].mean()) if len(ok) else math.nan
            summary[f"{column}_std"] = seed_spread(numbers[column].tolist())
        summaries.append(summary)
    return summaries


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """The summaries as Markdown: ``mean ± std`` where there are several seeds.

    Args:
        summaries: Rows from :func:`summarise`.

    Returns:
        The Markdown table.
    """
    rows = []
    for summary in summaries:
        seeds = summary["seeds"] + (f" (failed: {summary['failed_seeds']})" if summary["failed_seeds"] else "")
        row: dict[str, Any] = {
            "dataset": summary["dataset"],
            "model": summary["model"],
            "seeds": seeds,
            "epochs": summary["epochs"],
            "steps": summary["steps"],
        }
        for column in NUMERIC:
            std = summary[f"{column}_std"]
            spread = "" if math.isnan(std) else f" ± {format_value(column, std)}"
            row[column] = format_value(column, summary[column]) + spread
        rows.append(row)
    return markdown_table(rows)


def plot_accuracy_vs_throughput(
    summaries: Sequence[dict[str, Any]], path: Path, title: str, batch_size: int = 16
) -> Path:
    """Pixel AUPRO (image AUROC where no dataset has masks) against throughput at ``batch_size``, one point per row.

    Args:
        summaries: Rows from :func:`summarise`; rows without the metric or a throughput are left out.
        path: Image file to write.
        title: What was benchmarked, for the plot title.
        batch_size: Batch size of the throughput measurement, for the axis label.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, whatever the display
    from matplotlib.lines import Line2D

    metric = "pixel_AUPRO" if any(not math.isnan(s["pixel_AUPRO"]) for s in summaries) else "image_AUROC"
    models = list(dict.fromkeys(s["model"] for s in summaries))
    datasets = list(dict.fromkeys(s["dataset"] for s in summaries))
    markers = "osD^v<>ph*"
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for summary in summaries:
        if math.isnan(summary[metric]) or math.isnan(summary["throughput_img_s"]):
            continue
        std = summary[f"{metric}_std"]
        axes.errorbar(
            summary["throughput_img_s"],
            summary[metric],
            yerr=None if math.isnan(std) else std,
            fmt=markers[datasets.index(summary["dataset"]) % len(markers)],
            color=f"C{models.index(summary['model']) % 10}",
            markersize=8,
            capsize=3,
        )
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="", label=m) for i, m in enumerate(models)]
    if len(datasets) > 1:
        handles += [
            Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=d)
            for i, d in enumerate(datasets)
        ]
    axes.legend(handles=handles, fontsize="small", loc="best")
    speeds = [s["throughput_img_s"] for s in summaries if s["throughput_img_s"] > 0]
    wide = bool(speeds) and max(speeds) > 10 * min(speeds)
    if wide:
        axes.set_xscale("log")
    axes.set_xlabel(f"throughput at batch {batch_size} (images/s{', log scale' if wide else ''})")
    axes.set_ylabel(metric.replace("_", " "))
    axes.set_title(f"{metric.replace('_', ' ')} against throughput, {title}", fontsize="medium")
    axes.grid(visible=True, which="both", alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
