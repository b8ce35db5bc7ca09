"""Draw the learning curves of ``benchmarks/convergence.py`` with PaDiM and PatchCore as horizontal lines.

Reads the curves (``--curves``) and a benchmark's ``results.csv`` for the peers (``--peers``: PaDiM and
PatchCore on the same full data, backbone weights and metrics); writes the figure and a summary CSV with the
mean, standard deviation and range over seeds at every evaluated epoch.

    python benchmarks/plot_convergence.py --x epoch --peers benchmarks/results/peers/results.csv

It also writes ``--comparison``: the recipes ``fast``, ``fast_stride8``, ``fast_stride8_local`` and ``fast_stride8_mlp``
side by side with the peers (README), when the curves have the first two; and with ``--table``, every recipe's
metrics at every evaluated epoch (mean and range over seeds) as Markdown.
"""

from __future__ import annotations

import argparse
import ast
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib as mpl

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the arms are defined by the sibling convergence.py
from convergence import RECIPES_TRIED, recipe_settings

from adtr_anomalib.benchmark.report import seed_spread
from adtr_anomalib.plotting import save_with_palette

mpl.use("Agg")
import matplotlib.pyplot as plt

METRICS = (("pixel_AUROC", "pixel AUROC"), ("pixel_AUPRO", "pixel AUPRO"), ("image_AUROC_pool16_max", "image AUROC"))
# Other maps of the same runs (convergence.py's variant columns): column, label, marker, line style.
VARIANTS = {
    "pixel_AUROC": (
        ("pixel_AUROC_no32", "map without stride 32", "x", "--"),
        ("pixel_AUROC_no32_posz", "same, normalize_map (= fast)", "s", ":"),
        ("pixel_AUROC_posz_held", "same, statistics from held-back images", "^", "-."),
        ("pixel_AUROC_stagez", "stages standardised apart", "v", "-."),
    ),
    "pixel_AUPRO": (
        ("pixel_AUPRO_no32", "map without stride 32", "x", "--"),
        ("pixel_AUPRO_no32_posz", "same, normalize_map (= fast)", "s", ":"),
        ("pixel_AUPRO_posz_held", "same, statistics from held-back images", "^", "-."),
        ("pixel_AUPRO_stagez", "stages standardised apart", "v", "-."),
    ),
    "image_AUROC_pool16_max": (
        ("image_AUROC_posz_pool16_max", "normalize_map (= fast)", "s", ":"),
        ("image_AUROC_posz_held_pool16_max", "same, statistics from held-back images", "^", "-."),
        ("image_AUROC_stagez_pool16_max", "stages standardised apart", "v", "-."),
    ),
}
PEER_STYLES = {"PaDiM": ("black", "--"), "PatchCore": ("grey", ":")}
# Data set names of convergence.py -> the benchmark's data set labels.
BENCHMARK_NAMES = {"bsdata": "bsdata_pitting"}


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def training_settings(row: dict[str, str]) -> str:
    """A row's recipe settings without the evaluation epochs and device: rows of one recipe trained alike share it."""
    settings = ast.literal_eval(row["settings"])
    settings.pop("eval_epochs", None)
    settings.pop("device", None)
    return repr(settings)


def label_versions(curves: list[dict[str, str]], by_schedule: bool = False) -> list[dict[str, str]]:
    """Rows labelled by the arm of ``convergence.py`` whose current definition trained them; rows of a definition
    that no arm has any more are labelled ``<recipe> (<commit of its first row>)``. Runs on a GPU get `` on cuda``.

    ``by_schedule`` appends the length of the run's learning-rate schedule (``, N-epoch schedule``), so that runs of
    one arm on schedules of different lengths (its last test sets the length) are not averaged as seeds of one run.
    """
    arms = {repr(recipe_settings(recipe)): name for name, recipe in RECIPES_TRIED.items()}
    first_commit: dict[tuple[str, str], str] = {}
    labelled = []
    for row in curves:
        key = (row["recipe"], training_settings(row))
        first_commit.setdefault(key, row["commit"])
        label = arms.get(key[1], f"{row['recipe']} ({first_commit[key]})")
        settings = ast.literal_eval(row["settings"])
        if "device" in settings:
            label += f" on {settings['device']}"
        if by_schedule:
            label += f", {settings.get('schedule_epochs') or max(settings['eval_epochs'])}-epoch schedule"
        labelled.append({**row, "recipe": label})
    return labelled


def summarise(curves: list[dict[str, str]], by_schedule: bool = False) -> list[dict[str, object]]:
    """Mean, std and range over seeds for every (data set, recipe, epoch) and metric; the latest run of a seed.

    ``by_schedule``: runs on schedules of different lengths are different recipes (see :func:`label_versions`).
    """
    latest: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for row in label_versions(curves, by_schedule):
        latest[(row["dataset"], row["recipe"], row["epoch"], row["seed"])] = row
    groups: dict[tuple[str, str, int], list[dict[str, str]]] = defaultdict(list)
    for (dataset, recipe, epoch, _seed), row in latest.items():
        groups[(dataset, recipe, int(epoch))].append(row)
    summary = []
    for (dataset, recipe, epoch), rows in sorted(groups.items()):
        entry: dict[str, object] = {"dataset": dataset, "recipe": recipe, "epoch": epoch, "seeds": len(rows)}
        entry["train_seconds"] = round(statistics.fmean(float(r["train_seconds"]) for r in rows))
        for key in [k for k in rows[0] if k.startswith(("pixel_", "image_"))]:
            values = [float(r[key]) for r in rows if r.get(key)]  # columns added later are empty in older rows
            if not values:
                continue
            if len(values) < len(rows):
                entry[f"{key}_seeds"] = len(values)
            entry[f"{key}_mean"] = round(statistics.fmean(values), 4)
            entry[f"{key}_std"] = round(seed_spread(values), 4)
            entry[f"{key}_min"] = round(min(values), 4)
            entry[f"{key}_max"] = round(max(values), 4)
        summary.append(entry)
    return summary


def peers(paths: list[Path]) -> dict[tuple[str, str], dict[str, float]]:
    """(benchmark data set, model) -> mean metrics and fit seconds over its seeds."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in (row for path in paths for row in read(path)):
        if row["status"] == "ok" and row["model"] in PEER_STYLES:
            groups[(row["dataset"], row["model"])].append(row)
    return {
        key: {
            column: statistics.fmean(float(r[column]) for r in rows)
            for column in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "fit_s")
        }
        for key, rows in groups.items()
    }


def plot(summary: list[dict[str, object]], peer_rows: dict, figure: Path, x: str) -> None:
    datasets = list(dict.fromkeys(str(e["dataset"]) for e in summary))
    recipes = list(dict.fromkeys(str(e["recipe"]) for e in summary))
    fig, axes = plt.subplots(len(datasets), len(METRICS), figsize=(4.2 * len(METRICS), 3.0 * len(datasets)))
    axes = [axes] if len(datasets) == 1 else axes
    for row_axes, dataset in zip(axes, datasets, strict=True):
        for ax, (metric, title) in zip(row_axes, METRICS, strict=True):
            for index, recipe in enumerate(recipes):  # one colour per recipe in every panel
                points = [e for e in summary if e["dataset"] == dataset and e["recipe"] == recipe]
                if not points:
                    continue
                xs = [float(e[x]) / (60 if x == "train_seconds" else 1) for e in points]
                seeds = int(points[-1]["seeds"])
                label = f"ADTR {recipe} ({seeds} seed{'s' if seeds != 1 else ''})"
                ax.plot(xs, [e[f"{metric}_mean"] for e in points], marker="o", color=f"C{index}", label=label)
                minimum, maximum = [e[f"{metric}_min"] for e in points], [e[f"{metric}_max"] for e in points]
                ax.fill_between(xs, minimum, maximum, color=f"C{index}", alpha=0.2)
                for column, name, marker, style in VARIANTS.get(metric, ()):
                    variant = [e for e in points if f"{column}_mean" in e]
                    if variant:
                        ax.plot(
                            [float(e[x]) / (60 if x == "train_seconds" else 1) for e in variant],
                            [e[f"{column}_mean"] for e in variant],
                            marker=marker,
                            linestyle=style,
                            color=f"C{index}",
                            label=f"ADTR {recipe}, {name} ({variant[-1].get(f'{column}_seeds', seeds)} seed(s))",
                        )
            peer_metric = "image_AUROC" if metric.startswith("image_") else metric
            for model, (color, style) in PEER_STYLES.items():
                values = peer_rows.get((BENCHMARK_NAMES.get(dataset, dataset), model))
                if values is not None:
                    ax.axhline(values[peer_metric], color=color, linestyle=style, label=model)
            ax.set_title(f"{dataset}: {title}")
            ax.set_xlabel("training minutes" if x == "train_seconds" else "epoch")
            ax.grid(alpha=0.3)
    for row_axes in axes:
        row_axes[0].legend(fontsize=6)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=64)
    save_with_palette(figure)


# The recommended recipes side by side, each at the end of its schedule: (data set, arm, epoch, pixel AUROC, pixel
# AUPRO, image AUROC columns). "fast" on the textures is the fast_full_map runs' standardised map without stride 32.
STRIDE16 = {
    "bsdata": ("fast", 8, "pixel_AUROC", "pixel_AUPRO", "image_AUROC_pool16_max"),
    "texture": ("fast_full_map", 8, "pixel_AUROC_no32_posz", "pixel_AUPRO_no32_posz", "image_AUROC_posz_pool16_max"),
}
PLAIN_COLUMNS = ("pixel_AUROC", "pixel_AUPRO", "image_AUROC_pool16_max")
STRIDE8 = ("fast_s8p2_posz", 6, *PLAIN_COLUMNS)
MLP = ("fast_stride8_mlp", 6, *PLAIN_COLUMNS)  # fast_stride8 without attention
LOCAL = ("fast_stride8_local1", 6, *PLAIN_COLUMNS)  # fast_stride8 with local attention ("fast_stride8_local")


def recipe_table(summary: list[dict[str, object]], peer_rows: dict) -> str:
    """Markdown: ``fast`` (stride 16), ``fast_stride8``, ``fast_stride8_local`` and ``fast_stride8_mlp`` against the
    peers, the range over seeds in each cell."""
    entries = {(e["dataset"], e["recipe"], e["epoch"]): e for e in summary}

    def cell(dataset: str, arm: str, epoch: int, column: str) -> str:
        entry = entries.get((dataset, arm, epoch), {})
        if f"{column}_min" not in entry:
            return "n/a"
        low, high = f"{entry[f'{column}_min']:.3f}", f"{entry[f'{column}_max']:.3f}"
        return low if low == high else f"{low}-{high}"

    lines = [
        "| data set | metric | `fast`, stride 16, epoch 8 | `fast_stride8`, epoch 6 | `fast_stride8_local`, epoch 6 "
        "| `fast_stride8_mlp`, epoch 6 | PaDiM | PatchCore |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in ("bsdata", "brick", "gravel", "grass"):
        coarse = STRIDE16["bsdata" if dataset == "bsdata" else "texture"]
        for index, (metric, peer_metric) in enumerate(
            (("pixel AUROC", "pixel_AUROC"), ("pixel AUPRO", "pixel_AUPRO"), ("image AUROC", "image_AUROC"))
        ):
            name = BENCHMARK_NAMES.get(dataset, dataset)
            peer = [peer_rows.get((name, model), {}).get(peer_metric) for model in ("PaDiM", "PatchCore")]
            row = [
                name if index == 0 else "",
                metric,
                cell(dataset, coarse[0], coarse[1], coarse[2 + index]),
                *(cell(dataset, arm[0], arm[1], arm[2 + index]) for arm in (STRIDE8, LOCAL, MLP)),
                *("n/a" if value is None else f"{value:.3f}" for value in peer),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def epoch_table(summary: list[dict[str, object]]) -> str:
    """Markdown: every data set, recipe and evaluated epoch; each metric's mean over seeds and its range."""

    def cell(entry: dict[str, object], column: str) -> str:
        return f"{entry[f'{column}_mean']:.3f} ({entry[f'{column}_min']:.3f}-{entry[f'{column}_max']:.3f})"

    lines = [
        "| data set | recipe | epoch | seeds | " + " | ".join(title for _, title in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for entry in summary:
        cells = [str(entry[k]) for k in ("dataset", "recipe", "epoch", "seeds")]
        lines.append("| " + " | ".join([*cells, *(cell(entry, column) for column, _ in METRICS)]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=Path("benchmarks/results/convergence.csv"))
    parser.add_argument(
        "--peers",
        type=Path,
        nargs="*",
        default=[],
        help="results.csv files of adtr-anomalib benchmarks with PaDiM/PatchCore",
    )
    parser.add_argument("--summary", type=Path, default=Path("benchmarks/results/convergence_summary.csv"))
    parser.add_argument("--figure", type=Path, default=Path("docs/convergence.png"))
    parser.add_argument("--x", choices=["epoch", "train_seconds"], default="train_seconds")
    parser.add_argument(
        "--comparison",
        type=Path,
        default=Path("benchmarks/results/recipe_comparison.md"),
        help="Markdown table of the two recommended recipes with the peers (when the curves have both)",
    )
    parser.add_argument("--recipes", nargs="+", help="only these arms of convergence.py (default: every one)")
    parser.add_argument("--table", type=Path, help="also write every recipe's metrics per epoch as Markdown here")
    parser.add_argument(
        "--by-schedule",
        action="store_true",
        help="tell runs of one arm on schedules of different lengths apart (e.g. 6 and 50 epochs of the same arm)",
    )
    args = parser.parse_args()
    summary = summarise(read(args.curves), args.by_schedule)
    if args.recipes:
        summary = [e for e in summary if e["recipe"] in args.recipes]
    with args.summary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for e in summary for k in e)))
        writer.writeheader()
        writer.writerows(summary)
    peer_rows = peers(args.peers)
    plot(summary, peer_rows, args.figure, args.x)
    written = [args.summary, args.figure]
    arms = {str(e["recipe"]) for e in summary}
    if {STRIDE16["bsdata"][0], STRIDE16["texture"][0], STRIDE8[0]} <= arms:
        args.comparison.write_text(recipe_table(summary, peer_rows) + "\n")
        written.append(args.comparison)
    if args.table is not None:
        args.table.write_text(epoch_table(summary) + "\n")
        written.append(args.table)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
