"""Surfaces and objects together: which recipe and training length to recommend, decided on every set at once.

Reads learning-curve rows of ``benchmarks/convergence.py`` (several seeds) and the peers' benchmark results, and
writes one Markdown file with:

1. every arm's pixel AUROC, pixel AUPRO and image AUROC per data set, mean ± sample standard deviation over seeds,
   with PaDiM and PatchCore (same Lite0 weights, input and metrics) beside;
2. the same trained models' maps without the per-pixel standardisation (``raw``) and with each channel's error
   divided by its RMS on the training images (``whiten``): what the map normalisation does on each kind of part;
3. the decision rule for each candidate against the current default: it is adopted only if its mean gain over all
   sets and metrics is positive and it loses on no set by more than the seed spread (the larger sample standard
   deviation of the two arms); and the same rule with each data set left out.

    python benchmarks/objects_study.py --output benchmarks/results/objects_study.md
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the data sets are the sibling convergence.py's
from convergence import DATASETS

from adtr_anomalib.benchmark.report import seed_spread

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = {"pixel_AUROC": "pixel AUROC", "pixel_AUPRO": "pixel AUPRO", "image_AUROC_pool16_max": "image AUROC"}
MAP_VARIANTS = {
    "": "per-pixel standardised (the recipe's)",
    "_raw": "raw",
    "_blend": "half each",
    "_whiten": "channel-whitened",
}


@dataclass(frozen=True)
class Arm:
    """One training recipe and length: the rows of ``recipe`` tested at ``column == value`` on a schedule of
    ``length`` (the run's last test), from any of the curve files."""

    label: str
    recipe: str
    column: str
    value: int

    def matches(self, row: dict[str, str]) -> bool:
        if row["recipe"] != self.recipe or str(row.get(self.column) or "") != str(self.value):
            return False
        settings = ast.literal_eval(row["settings"])
        planned = settings.get("eval_steps" if self.column == "step" else "eval_epochs") or []
        return bool(planned) and max(planned) == self.value and not settings.get("schedule_epochs")


BASELINE = Arm("fast_stride8_local, 6 epochs (0.1.x default)", "fast_stride8_local1", "epoch", 6)
CANDIDATES = (
    Arm("fast, 500 steps", "fast", "step", 500),
    Arm("fast_stride8, 500 steps", "fast_s8p2_posz", "step", 500),
)
RECOMMENDED = CANDIDATES[0]  # adtr_anomalib.models.adtr.components.training.DEFAULT_RECIPE for DEFAULT_STEPS
OTHERS = (Arm("fast_stride8_local, 500 steps", "fast_stride8_local1", "step", 500),)


def read_rows(paths: list[Path]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in paths:
        with path.open(newline="") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def arm_values(rows: list[dict[str, str]], arm: Arm, dataset: str, column: str) -> list[float]:
    """One value per seed (the latest row of each seed)."""
    latest = {r["seed"]: r for r in rows if r["dataset"] == dataset and arm.matches(r) and r.get(column)}
    return [float(r[column]) for _, r in sorted(latest.items())]


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = seed_spread(values)
    return f"{statistics.fmean(values):.3f}" + ("" if math.isnan(spread) else f" ± {spread:.3f}")


def peer_rows(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    # The benchmark's image AUROC is the models' own score (ADTR's is the curves' pool16_max); NaN without masks.
    columns = {"pixel_AUROC": "pixel_AUROC", "pixel_AUPRO": "pixel_AUPRO", "image_AUROC_pool16_max": "image_AUROC"}
    return {
        (r["dataset"], r["model"]): {ours: float(r[theirs] or "nan") for ours, theirs in columns.items()} for r in rows
    }


def main_table(rows: list[dict[str, str]], peers: dict) -> list[str]:
    lines = ["| data set | arm | seeds | " + " | ".join(METRICS.values()) + " |", "|---|---|---|---|---|---|"]
    for short, name in DATASETS.items():
        for arm in (BASELINE, *CANDIDATES, *OTHERS):
            values = {c: arm_values(rows, arm, short, c) for c in METRICS}
            if not any(values.values()):
                continue
            seeds = len(values["pixel_AUROC"])
            lines.append(f"| {short} | {arm.label} | {seeds} | " + " | ".join(cell(values[c]) for c in METRICS) + " |")
        for model in ("PaDiM", "PatchCore"):
            if (name, model) in peers:
                numbers = peers[(name, model)]
                cells = [f"{numbers[c]:.3f}" if not math.isnan(numbers[c]) else "n/a" for c in METRICS]
                lines.append(f"| {short} | {model} | 1 | " + " | ".join(cells) + " |")
    return lines


def map_table(rows: list[dict[str, str]]) -> list[str]:
    header = "| data set | arm | map | " + " | ".join(METRICS.values()) + " |"
    lines = [header, "|---|---|---|---|---|---|"]
    for short in DATASETS:
        for arm in CANDIDATES:
            for suffix, label in MAP_VARIANTS.items():
                columns = [
                    c.replace("_pool16_max", "") + suffix + ("_pool16_max" if "image" in c else "") for c in METRICS
                ]
                values = [arm_values(rows, arm, short, column) for column in columns]
                if any(values):
                    lines.append(f"| {short} | {arm.label} | {label} | " + " | ".join(cell(v) for v in values) + " |")
    return lines


def headline_table(rows: list[dict[str, str]], peers: dict, arm: Arm) -> list[str]:
    """The recommended arm beside PaDiM and PatchCore, one row per data set and metric (the README's table)."""
    lines = ["| data set | metric | ADTR | PaDiM | PatchCore |", "|---|---|---|---|---|"]
    for short, name in DATASETS.items():
        for column, label in METRICS.items():
            ours = arm_values(rows, arm, short, column)
            theirs = [peers.get((name, model), {}).get(column, math.nan) for model in ("PaDiM", "PatchCore")]
            if ours:
                cells = [cell(ours), *("n/a" if math.isnan(v) else f"{v:.3f}" for v in theirs)]
                lines.append(f"| {short} | {label} | " + " | ".join(cells) + " |")
    return lines


def differences(rows: list[dict[str, str]], candidate: Arm) -> dict[tuple[str, str], tuple[float, float]]:
    """(data set, metric) -> (candidate mean minus baseline mean, seed spread), where both arms have the set."""
    result = {}
    for short in DATASETS:
        for column in METRICS:
            ours, theirs = arm_values(rows, candidate, short, column), arm_values(rows, BASELINE, short, column)
            if ours and theirs:
                spreads = [s for s in (seed_spread(ours), seed_spread(theirs)) if not math.isnan(s)]
                result[(short, column)] = (statistics.fmean(ours) - statistics.fmean(theirs), max(spreads, default=0.0))
    return result


def decision(diffs: dict[tuple[str, str], tuple[float, float]], left_out: str | None = None) -> str:
    kept = {key: value for key, value in diffs.items() if key[0] != left_out}
    if not kept:
        return "no data"
    gain = statistics.fmean(delta for delta, _ in kept.values())
    losses = [f"{s} {METRICS[c]} {d:+.3f} (spread {sp:.3f})" for (s, c), (d, sp) in kept.items() if d < -sp]
    verdict = "adopt" if gain > 0 and not losses else "reject"
    return f"{verdict}: mean gain {gain:+.4f}" + (f"; loses {', '.join(losses)}" if losses else "")


def decision_table(rows: list[dict[str, str]]) -> list[str]:
    lines = [
        "| candidate against the 0.1.x default | all sets | " + " | ".join(f"without {s}" for s in DATASETS) + " |"
    ]
    lines.append("|" + "---|" * (len(DATASETS) + 2))
    for candidate in CANDIDATES:
        diffs = differences(rows, candidate)
        cells = [decision(diffs)] + [decision(diffs, left_out=s) for s in DATASETS]
        lines.append(f"| {candidate.label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--curves",
        nargs="+",
        type=Path,
        default=[RESULTS / "short_schedule.csv", RESULTS / "objects_steps.csv"],
        help="learning-curve CSVs of benchmarks/convergence.py",
    )
    parser.add_argument("--peers", type=Path, default=RESULTS / "peers" / "results_1.csv")
    parser.add_argument("--output", type=Path, default=RESULTS / "objects_study.md")
    parser.add_argument(
        "--headline",
        type=Path,
        default=RESULTS / "headline.md",
        help="also write the recommended arm against the peers here (the README's results table)",
    )
    args = parser.parse_args()
    rows = read_rows(args.curves)
    source = (
        f"Curves: {', '.join(p.name for p in args.curves)}; peers: {args.peers.parent.name}/{args.peers.name}. "
        "Mean ± sample standard deviation over seeds."
    )
    peers = peer_rows(args.peers)
    # One table a file, so each can be quoted (and checked) on its own: arms, map variants, decisions, headline.
    tables = {
        args.output: main_table(rows, peers),
        args.output.with_name(f"{args.output.stem}_maps.md"): map_table(rows),
        args.output.with_name(f"{args.output.stem}_decision.md"): decision_table(rows),
        args.headline: [*headline_table(rows, peers, RECOMMENDED), "", f"ADTR: {RECOMMENDED.label}."],
    }
    for path, lines in tables.items():
        path.write_text("\n".join([*lines, "", source]) + "\n")
        print("\n".join(lines), end="\n\n")


if __name__ == "__main__":
    main()
