"""CPU inference speed: ADTR (torch eager, OpenVINO FP32/bf16/FP16/INT8) against PaDiM and PatchCore, all with
the same Lite0 backbone and exported the same way, measured in one process so that the ratios hold on a noisy
machine.

For every model and runtime it prints latency at batch 1 (median), throughput at batch 16 (256x256 inputs; fastest
of the timed batches, as `adtr-anomalib benchmark` measures it), peak RSS (the kernel's high-water mark)
while that runtime was loaded and running, the exported file size, the GFLOPs per image (counted by torch's
``FlopCounterMode`` on the eager model) and the achieved GFLOP/s against this CPU's measured matmul peak at
the precision the runtime computes in, plus parity with the torch model on real images (max |Δ| of the
normalised score and anomaly map, label agreement), judged against the tolerances of ``tests/test_export.py``
(``adtr_anomalib.deploy.PARITY_TOLERANCES``).

Models are fitted briefly (64 images) on the built-in brick textures: speed does not depend on how well they
are trained. PatchCore's memory bank is sized like a 1% coreset of a 550-image training set (BSData's) and
filled with random training patches: its nearest-neighbour cost depends only on the bank's size, and
anomalib's greedy coreset search takes tens of minutes on 2 cores. When PatchCore is among ``--models`` every model
runs under ``MALLOC_MMAP_THRESHOLD_=1048576`` (PatchCore needs it on small machines; allocator settings alone move
throughput, so all models get the same); without it, under glibc's default.

Run:  python benchmarks/inference_speed.py [--threads 2] [--adtr-checkpoint model.ckpt] [--output results/speed]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import openvino
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from torch.utils.flop_counter import FlopCounterMode

from adtr_anomalib import ADTR
from adtr_anomalib.benchmark import build_model, heap_setting_for, markdown_table, write_csv
from adtr_anomalib.benchmark.measure import fastest_interleaved, machine, matmul_peak, peak_memory, timed
from adtr_anomalib.benchmark.report import unused_path
from adtr_anomalib.data import default_dataset_root, make_texture_dataset, mvtec_layout_folder
from adtr_anomalib.deploy import PARITY_TOLERANCES, openvino_config

BACKBONE = "tf_efficientnet_lite0"
SIZE = 256
# Patches per image on PatchCore's stride-8 grid at 256x256, times a 550-image training set, times a 1% coreset.
PATCHCORE_BANK = 32 * 32 * 550 // 100
FIT_BATCHES = 4  # batches of 16 training images: enough for post-processing statistics; speed is the same


@dataclass
class Runtime:
    """One way of running one model: a callable on a float32 NCHW batch returning score and map arrays."""

    model: str
    runtime: str
    precision: str  # what the runtime computes in: "fp32", "bf16" or "int8"
    tolerance_class: str  # key of PARITY_TOLERANCES
    load: Callable[[], Callable[[np.ndarray], dict[str, np.ndarray]]]
    file: Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenVINO (default 2)")
    parser.add_argument("--adtr-checkpoint", type=Path, help="a trained ADTR checkpoint (default: fit 1 epoch here)")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed batch-1 runs (default %(default)s)")
    parser.add_argument(
        "--throughput-runs",
        type=int,
        default=20,
        help="timed batch-16 runs of each runtime of a model, in turns; the fastest counts (default %(default)s)",
    )
    parser.add_argument(
        "--models", nargs="+", default=["adtr", "padim", "patchcore"], choices=["adtr", "padim", "patchcore"]
    )
    parser.add_argument("--output", type=Path, default=Path("results/inference_speed"), help="CSV folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Fit, export, measure; print the table and the target ratios."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    heap_setting_for(args.models)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak on {args.threads} threads: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    root = make_texture_dataset(default_dataset_root(), "brick")
    images = parity_images(root)
    batch16 = np.ascontiguousarray(np.concatenate([images, images])[:16])
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            model = fit(name, root, Path(work), args.adtr_checkpoint)
            gflops = count_gflops(model)
            with torch.no_grad():
                expected = {k: v.numpy() for k, v in model(torch.from_numpy(images))._asdict().items() if v is not None}
            variants = list(runtimes(name, model, root, Path(work) / name, args.threads))
            measured = [measure(runtime, images, expected, args) for runtime in variants]
            # Throughput of all runtimes of one model timed in turns, so their ratios hold on a busy machine.
            runners = [runtime.load() for runtime in variants]
            seconds = fastest_interleaved([lambda run=run: run(batch16) for run in runners], args.throughput_runs)
            del runners
            for runtime, row, spent in zip(variants, measured, seconds, strict=True):
                achieved = gflops * 16 / spent
                rows.append({
                    **row,
                    "throughput_b16": round(16 / spent, 2),
                    "GFLOPs/img": round(gflops, 2),
                    "achieved_GFLOP/s": round(achieved, 1),
                    # No int8 matmul peak is measured: INT8 rows get no ratio.
                    "of_peak": round(achieved / peaks[runtime.precision], 2) if runtime.precision in peaks else "n/a",
                })  # fmt: skip
            print(markdown_table(rows[-len(variants) :]), flush=True)
    table, summary = markdown_table(rows), targets(rows, peaks)
    print(f"\n{table}\n\n{summary}")
    report = unused_path(args.output, "results.md")
    report.write_text(f"{table}\n\n{summary}\n\n{describe(peaks)}\n")
    print(f"CSV: {write_csv(rows, args.output)}, table: {report}")
    return 0


def describe(peaks: dict[str, float]) -> str:
    """When, where and how the table was measured."""
    return (
        f"{datetime.now().isoformat(timespec='minutes')}, {machine()}; matmul peak fp32 {peaks['fp32']:.0f}, bf16 "
        f"{peaks['bf16']:.0f} GFLOP/s; {SIZE}x{SIZE} inputs; OpenVINO {openvino.__version__}."
    )


def parity_images(root: Path, count: int = 8) -> np.ndarray:
    """Real test images, half good and half defective, resized to 256x256 (float32 NCHW in [0, 1])."""
    good = sorted((root / "test" / "good").glob("*.png"))[: count // 2]
    bad = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")[: count // 2]
    batch = torch.stack([read_image(p, as_tensor=True) for p in good + bad])
    return torch.nn.functional.interpolate(batch, size=(SIZE, SIZE), mode="bilinear", antialias=True).numpy()


def fit(name: str, root: Path, work: Path, adtr_checkpoint: Path | None) -> AnomalibModule:
    """A fitted model with post-processing statistics, so exported graphs give normalised scores."""
    if name == "adtr" and adtr_checkpoint is not None:
        return ADTR.load_from_checkpoint(adtr_checkpoint, weights_only=True).eval()
    options: dict[str, Any] = {}
    if name == "adtr":
        options = {"recipe": "fast_stride8_local"}  # the recommended recipe
    if name == "patchcore":
        options = {"coreset_sampling_ratio": PATCHCORE_BANK / (32 * 32 * FIT_BATCHES * 16)}
    model = build_model(name, BACKBONE, SIZE, **options)
    model.visualizer = None
    if name == "patchcore":
        model.model.subsample_embedding = lambda _ratio: _random_memory_bank(model.model)
    datamodule = mvtec_layout_folder(root, train_batch_size=16, eval_batch_size=16, seed=0)
    engine = Engine(
        max_epochs=1, limit_train_batches=FIT_BATCHES, default_root_dir=work, logger=False, enable_progress_bar=False
    )
    engine.fit(model=model, datamodule=datamodule)
    if name == "patchcore":
        del model.model.subsample_embedding  # the class's method again: an instance lambda cannot be pickled (export)
    return model.eval()


def _random_memory_bank(patchcore: torch.nn.Module) -> None:
    """Fill PatchCore's memory bank with ``PATCHCORE_BANK`` random training patches instead of the greedy
    coreset: the same size and width, hence the same nearest-neighbour cost, without a search that takes tens of
    minutes on 2 cores. Only for timing; the accuracy benchmarks use anomalib's coreset."""
    embeddings = torch.vstack(patchcore.embedding_store)
    patchcore.embedding_store.clear()
    patchcore.memory_bank = embeddings[torch.randperm(len(embeddings))[:PATCHCORE_BANK]]


def count_gflops(model: AnomalibModule) -> float:
    """Forward GFLOPs per image of the torch model (2 per multiply-add), at batch 1."""
    counter = FlopCounterMode(display=False)
    with counter:  # not under no_grad: torch's flop counter needs autograd to track modules
        model.model(torch.rand(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 1e9


def runtimes(name: str, model: AnomalibModule, root: Path, work: Path, threads: int) -> Iterator[Runtime]:
    """torch eager and OpenVINO variants of one model; ADTR also gets FP16 and INT8 OpenVINO models."""
    label = {"adtr": "ADTR", "padim": "PaDiM", "patchcore": "PatchCore"}[name]
    torch_file = model.to_torch(work / "torch")
    yield Runtime(label, "torch eager", "fp32", "fp32", lambda: _torch_runner(model), torch_file)
    fp32 = model.to_openvino(work / "fp32")
    yield Runtime(label, "OpenVINO FP32", "fp32", "fp32", lambda: _ov_runner(fp32, "f32", threads), fp32)
    yield Runtime(label, "OpenVINO FP32 IR, bf16", "bf16", "reduced", lambda: _ov_runner(fp32, "bf16", threads), fp32)
    if name != "adtr":
        return
    fp16 = model.to_openvino(work / "fp16", compression_type=CompressionType.FP16)
    yield Runtime(label, "OpenVINO FP16 IR, bf16", "bf16", "reduced", lambda: _ov_runner(fp16, "bf16", threads), fp16)
    int8 = model.to_openvino(work / "int8", compression_type=CompressionType.INT8)
    yield Runtime(
        label, "OpenVINO INT8 weights, bf16", "bf16", "reduced", lambda: _ov_runner(int8, "bf16", threads), int8
    )
    calibration = mvtec_layout_folder(root, train_batch_size=16, eval_batch_size=16, seed=0)
    ptq = model.to_openvino(work / "ptq", compression_type=CompressionType.INT8_PTQ, datamodule=calibration)
    yield Runtime(label, "OpenVINO INT8 PTQ", "int8", "int8_ptq", lambda: _ov_runner(ptq, "bf16", threads), ptq)


def _torch_runner(model: AnomalibModule) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = model(torch.from_numpy(batch))
        return {"pred_score": result.pred_score.numpy(), "anomaly_map": result.anomaly_map.numpy(),
                "pred_label": result.pred_label.numpy()}  # fmt: skip

    return run


def _ov_runner(xml: Path, precision: str, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """An OpenVINO model as a runner. A model exported with a static batch (anomalib's PatchCore export is
    fixed at the example batch) runs in chunks of that size, the last one padded; the table says so."""
    compiled = openvino.Core().compile_model(str(xml), "CPU", openvino_config(precision, threads))
    batch_dim = compiled.inputs[0].partial_shape[0]
    fixed = batch_dim.get_length() if batch_dim.is_static else None

    def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled(batch)
        return {output.get_any_name(): result[output] for output in compiled.outputs}

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        if fixed is None or len(batch) == fixed:
            return infer(batch)
        chunks = []
        for start in range(0, len(batch), fixed):
            chunk = batch[start : start + fixed]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            chunks.append({name: value[: len(chunk)] for name, value in infer(padded).items()})
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}

    run.fixed_batch = fixed  # type: ignore[attr-defined]
    return run


def measure(runtime: Runtime, images: np.ndarray, expected: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Latency (batch 1), peak RSS, file size and parity of one runtime (throughput: timed with its peers)."""
    with peak_memory() as memory:
        run = runtime.load()
        actual = run(images)
        run(images[:1])  # warm-up at both batch sizes (OpenVINO compiles shapes on first use)
        latencies = [
            timed(lambda index=index: run(images[index % len(images) : index % len(images) + 1]))[1]
            for index in range(args.latency_runs)
        ]
    score_error = float(np.abs(actual["pred_score"].astype(np.float32) - expected["pred_score"]).max())
    map_error = float(np.abs(actual["anomaly_map"].astype(np.float32) - expected["anomaly_map"]).max())
    tolerance = PARITY_TOLERANCES[runtime.tolerance_class]
    labels_agree = float((actual["pred_label"].astype(bool) == expected["pred_label"].astype(bool)).mean())
    size = runtime.file.stat().st_size + (
        runtime.file.with_suffix(".bin").stat().st_size if runtime.file.suffix == ".xml" else 0
    )
    return {
        "model": runtime.model,
        "runtime": runtime.runtime,
        "export_batch": getattr(run, "fixed_batch", None) or "dynamic",
        "latency_b1_ms": round(1000 * float(np.median(latencies)), 1),
        "peak_RSS_MB": round(memory.peak_mb),
        "RSS_added_MB": round(memory.added_mb),
        "file_MiB": round(size / 2**20, 1),
        "max_score_diff": score_error,
        "max_map_diff": map_error,
        "labels_agree": labels_agree,
        "parity": "pass" if max(score_error, map_error) <= tolerance else f"FAIL (tol {tolerance})",
    }


def targets(rows: Sequence[dict[str, Any]], peaks: dict[str, float]) -> str:
    """The issue's three targets as ratios from this run."""
    by = {(row["model"], row["runtime"]): row for row in rows}
    lines = ["Targets (ratios from this run):"]
    adtr_ov, patchcore_ov = by.get(("ADTR", "OpenVINO FP32")), by.get(("PatchCore", "OpenVINO FP32"))
    if adtr_ov and patchcore_ov:
        ratio = adtr_ov["throughput_b16"] / patchcore_ov["throughput_b16"]
        lines.append(f"- ADTR OpenVINO FP32 / PatchCore OpenVINO FP32 throughput: {ratio:.2f} (target >= 1)")
    int8, bf16 = by.get(("ADTR", "OpenVINO INT8 PTQ")), by.get(("ADTR", "OpenVINO FP32 IR, bf16"))
    if int8 and bf16:
        ratio = int8["throughput_b16"] / bf16["throughput_b16"]
        lines.append(
            f"- ADTR INT8 PTQ / FP32 IR at bf16 throughput: {ratio:.2f} (target >= 1.3; parity {int8['parity']})"
        )
    eager = by.get(("ADTR", "torch eager"))
    passing = [r for r in rows if r["model"] == "ADTR" and r["runtime"] != "torch eager" and r["parity"] == "pass"]
    if eager and passing:
        best = max(passing, key=lambda r: r["throughput_b16"])
        ratio = best["throughput_b16"] / eager["throughput_b16"]
        lines.append(f"- best passing ADTR OpenVINO ({best['runtime']}) / torch eager: {ratio:.2f} (target >= 1.5)")
        for row in [r for r in rows if r["model"] == "ADTR" and isinstance(r["of_peak"], float)]:
            lines.append(
                f"- ADTR {row['runtime']}: {row['achieved_GFLOP/s']} GFLOP/s = {row['of_peak']:.0%} of the matmul "
                f"peak at its precision (target >= 50%)"
            )
        lines.append(f"  (matmul peaks: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s)")
    bf16 = by.get(("ADTR", "OpenVINO FP32 IR, bf16"))
    if bf16:
        # The physical limit of one image: its GFLOPs at the bf16 matmul peak, as if nothing but matmuls ran.
        limit_ms = 1000 * bf16["GFLOPs/img"] / peaks["bf16"]
        latency = bf16["latency_b1_ms"]
        lines.append(
            f"- ADTR batch-1 latency, FP32 IR at bf16: {latency} ms = {latency / limit_ms:.1f}x the physical limit"
            f" ({bf16['GFLOPs/img']} GFLOP at the bf16 matmul peak: {limit_ms:.1f} ms)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
