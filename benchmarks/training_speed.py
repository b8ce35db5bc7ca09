"""Training speed of ADTR's transformer on cached features, against the machine's measured matmul peak.

One process measures, in this order: the float32 and bfloat16 matmul peaks (2048x2048 products), then training
images/s of the reconstructor (forward, backward, AdamW step) on features of the Lite0 shape (512 channels, 16x16
tokens, batch 16; drawn once, outside the timed steps) for the paper's configuration and for the "fast" recipe,
the latter also on the stride-8 grid with 2x2 patch tokens (``feature_stride=8, patch_size=2``), with and without
the attention bias towards nearby tokens of the recommended recipe ``"fast_stride8_local"``, and for the paper's
configuration with ``attention_dropout="keys"``; the last line is for the recommended recipe.
The configurations' steps are timed in turns and the fastest step of each counts, so a busy spell on a shared
machine does not favour one. FLOPs are counted by ``torch.utils.flop_counter`` over one real step, not estimated.
Training runs in bf16 where the CPU computes it natively (``native_bf16``) and in float32 elsewhere, as
``ADTR(bf16=True)`` does; the percentage is of the peak of the precision that ran. On a CPU without native bf16
the emulated bf16 peak is not measured (one product can take a minute there) unless ``--emulated-bf16`` asks for it
with the row "paper, bf16 forced": the code path before that check (bf16 autocast on every CPU), run for one step.

    python benchmarks/training_speed.py
    python benchmarks/training_speed.py --steps 10 --output benchmarks/results/training_speed.csv
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adtr_anomalib.benchmark.measure import fastest_interleaved, matmul_peak, provenance, timed
from adtr_anomalib.benchmark.report import append_csv
from adtr_anomalib.models.adtr.components import ADTRReconstructor
from adtr_anomalib.models.adtr.components.settings import RECIPES
from adtr_anomalib.models.adtr.components.training import native_bf16
from adtr_anomalib.models.adtr.loss import ADTRLoss

CHANNELS, TOKENS, BATCH = 512, 256, 16
RECOMMENDED = "fast, stride 8 with 2x2 patch tokens, local attention"  # recipe "fast_stride8_local"


def training_step(
    reconstructor: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool, features: torch.Tensor
) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reconstruction = reconstructor(features)
    loss = ADTRLoss()(features, reconstruction.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reconstructor.parameters(), 0.1)
    optimizer.step()


def prepare(
    dropout: float,
    jitter: float,
    bf16: bool,
    patch: int = 1,
    attention_dropout: str = "weights",
    locality: float = 0.0,
    compiled: bool = False,
) -> tuple[Callable[[], None], float]:
    """One configuration's training step, warmed up, and its GFLOP per image.

    ``patch`` 2 is the stride-8 grid (32x32 positions) with 2x2-position tokens: as many tokens as stride 16.
    ``locality``: ``attention_locality`` of the reconstructor. ``compiled``: the step runs ``torch.compile``'s
    reconstructor (compiled here, by a first step); the FLOPs are counted on the eager one.
    """
    torch.manual_seed(0)
    grid = 16 * patch
    # Drawn once: in training the features come from the backbone or its cache, not from a random generator, whose
    # draw (8M numbers at stride 8) would otherwise be timed as part of the step.
    features = torch.randn(BATCH, CHANNELS, grid, grid)
    reconstructor = ADTRReconstructor(
        CHANNELS,
        TOKENS,
        dropout=dropout,
        feature_jitter=jitter,
        patch_size=patch,
        attention_dropout=attention_dropout,  # type: ignore[arg-type]
        attention_locality=locality,
    )
    reconstructor.train()
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=1e-4)
    counter = FlopCounterMode(display=False)
    # Counted on PyTorch's unfused attention: the counter does not see inside the fused CPU kernel, which does the
    # same products.
    with counter, sdpa_kernel(SDPBackend.MATH):
        training_step(reconstructor, optimizer, bf16, features)
    network = torch.compile(reconstructor) if compiled else reconstructor
    step = partial(training_step, network, optimizer, bf16, features)
    if compiled:
        step()
    return step, counter.get_total_flops() / BATCH / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration, in turns (batch 16)")
    parser.add_argument("--output", type=Path, help="append the rows to this CSV file")
    parser.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="on a CPU without native bf16, also time emulated bf16 (its peak and one 'bf16 forced' step: minutes)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the recommended recipe under torch.compile (inductor; a minute or more to compile)",
    )
    args = parser.parse_args()
    bf16 = native_bf16(torch.device("cpu"))
    peaks = {"fp32": matmul_peak(torch.float32)}
    if bf16 or args.emulated_bf16:
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    precision = "bf16" if bf16 else "fp32"
    fast = {"dropout": RECIPES["fast"]["dropout"], "jitter": RECIPES["fast"]["feature_jitter"], "bf16": bf16}
    configurations: dict[str, dict] = {
        "paper": {"dropout": 0.1, "jitter": 0.0, "bf16": bf16},
        "paper, attention_dropout='keys'": {"dropout": 0.1, "jitter": 0.0, "bf16": bf16, "attention_dropout": "keys"},
        "fast, stride 8 with 2x2 patch tokens": {**fast, "patch": 2},
        RECOMMENDED: {**fast, "patch": 2, "locality": RECIPES["fast_stride8_local"]["attention_locality"]},
        "fast": fast,
    }
    if args.compile:
        configurations[f"{RECOMMENDED}, torch.compile"] = {**configurations[RECOMMENDED], "compiled": True}
    measured = ", ".join(f"{name} {peak:.0f} GFLOP/s" for name, peak in peaks.items())
    print(f"matmul peak: {measured}; training in {precision}")
    prepared = {name: prepare(**settings) for name, settings in configurations.items()}
    # In turns, so that a busy spell on a shared machine slows every configuration alike; the fastest step of each.
    fastest = fastest_interleaved([step for step, _ in prepared.values()], rounds=args.steps)
    seconds = dict(zip(prepared, fastest, strict=True))
    if not bf16 and args.emulated_bf16:  # emulated bf16 is ~30x slower or worse: one step, alone
        name = "paper, bf16 forced (before the fix)"
        configurations = {name: {"dropout": 0.1, "jitter": 0.0, "bf16": True}, **configurations}
        prepared[name] = prepare(**configurations[name])
        seconds[name] = timed(prepared[name][0])[1]
    rows = []
    for name, settings in configurations.items():
        gflop, images_per_second = prepared[name][1], BATCH / seconds[name]
        ran = "bf16" if settings["bf16"] else "fp32"
        rate = images_per_second * gflop
        rows.append(
            {
                "configuration": name,
                "precision": ran,
                "img_per_s": round(images_per_second, 2),
                "gflop_per_img": round(gflop, 2),
                "gflop_per_s": round(rate, 1),
                "peak_gflop_per_s": round(peaks[ran], 1),
                "pct_of_peak": round(100 * rate / peaks[ran], 1),
            }
        )
        print(
            f"{name:<52} {ran}  {images_per_second:6.2f} img/s  {gflop:5.2f} GFLOP/img  {rate:6.1f} GFLOP/s  "
            f"{100 * rate / peaks[ran]:5.1f}% of the {ran} peak"
        )
    if args.output is not None:
        write(args.output, rows)
    best = next(row for row in rows if row["configuration"] == RECOMMENDED)
    rate = f"{best['img_per_s']} img/s, {best['gflop_per_s']} GFLOP/s"
    if bf16:
        print(f"training ({RECOMMENDED}): {rate}, {best['pct_of_peak']}% of the bf16 matmul peak")
        return
    of_bf16 = f"{100 * best['gflop_per_s'] / peaks['bf16']:.1f}% of the emulated bf16 peak, " if "bf16" in peaks else ""
    print(
        f"training ({RECOMMENDED}): {rate}, {best['pct_of_peak']}% of the fp32 matmul peak "
        f"({of_bf16}no native bf16 on this CPU: training runs in fp32)"
    )


def write(path: Path, rows: list[dict]) -> None:
    """Append rows with date, commit and machine (the file keeps every earlier run)."""
    append_csv([{**provenance(), **row} for row in rows], path)


if __name__ == "__main__":
    main()
