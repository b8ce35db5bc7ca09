"""The identity shortcut (paper §3.2) as a measured experiment: a linear reconstructor against ADTR's query attention.

Both reconstruct real frozen Lite0 features (stride 8, 16x16 tokens at 128 px) of normal images of the built-in
textures, for the same number of steps, each at the learning rate of a small sweep that gives it the lowest
training loss (chosen on normal training images only, never on the defects). Then, on the test images:

- normal and anomalous token errors (squared L2 over channels; anomalous = grid cells at least half covered by a
  defect mask, normal = every cell of the good test images), each also relative to the tokens' feature energy;
- the token AUROC: how well the error separates anomalous from normal tokens (what anomaly detection needs);
- for the linear (1x1 conv) model, ``||W - I||_F / ||I||_F`` at the start and the end: whether it drifts toward
  the identity, which reconstructs anomalies as well as normal features.

The same attention with ``attention_locality=1`` (``fast_stride8_local``'s local attention) is a third arm. A
zero-output model (error = feature energy) and a copy model (error 0) are scored as references. Rows go to
``--output`` (CSV with date, commit, machine and command); the table is printed.

The object arm (``--textures part``) asks what a surface cannot: a part photographed in a fixed pose, a plate with
four bolts, whose defect is a bolt missing, which leaves plain plate where a bolt belongs. Each missing bolt looks
like the plate around it, so a model that rebuilds a position from its neighbours rebuilds the empty place as empty
and must miss it; two more references show that: the mean of the 8 neighbouring tokens (error to it), and the
training images' mean token at each position (a per-position prior, as PaDiM's), which must find it.

    OMP_NUM_THREADS=1 python benchmarks/identity_shortcut.py --textures brick grass --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/identity_shortcut.py --textures part \
        --output benchmarks/results/identity_shortcut_part.csv
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc
from torchvision.io import ImageReadMode, decode_image

from adtr_anomalib.benchmark.measure import provenance
from adtr_anomalib.data import make_texture_dataset
from adtr_anomalib.models.adtr.components import ADTRReconstructor
from adtr_anomalib.models.adtr.torch_model import ADTRModel

SIZE = 128
STRIDE = 8  # 16 x 16 tokens at 128 px
LEARNING_RATES = (1e-3, 3e-3, 1e-2)


@dataclass
class TokenSet:
    """Features of the training images and of the test images, with which test tokens are anomalous."""

    train: torch.Tensor  # (N, C, h, w) normal training features
    test: torch.Tensor  # (M, C, h, w) good and defective test images
    anomalous: torch.Tensor  # (M, h, w) bool: cell at least half covered by a defect mask
    normal: torch.Tensor  # (M, h, w) bool: every cell of a good test image


BOLTS = ((40, 40), (40, 88), (88, 40), (88, 88))  # bolt centres (row, column) of the part at SIZE px
BOLT_RADIUS = 9


def make_part_dataset(root: Path, n_train: int = 48, n_test_good: int = 12, n_test_missing: int = 12) -> Path:
    """A fixed-pose part in MVTec layout (once; reused when complete): a textured plate with four bolts on a dark
    background, shifted by up to 2 px and lit a little differently per image; defect ``missing_bolt`` leaves one
    bolt out, its place masked."""
    folder = root / "part"
    counts = {"train": n_train, "good": n_test_good, "missing": n_test_missing}
    if (folder / "counts.json").is_file() and json.loads((folder / "counts.json").read_text()) == counts:
        return folder
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]

    def render(missing: int | None) -> tuple[np.ndarray, np.ndarray]:
        dy, dx = rng.integers(-2, 3, size=2)
        noise = rng.normal(0.0, 1.0, (SIZE // 4, SIZE // 4))
        grain = np.kron(noise, np.ones((4, 4))) * 0.03  # the plate's coarse surface grain
        image = 0.12 + rng.normal(0.0, 0.01, (SIZE, SIZE))
        plate = (abs(rows - 64 - dy) < 48) & (abs(columns - 64 - dx) < 48)
        image[plate] = rng.uniform(0.5, 0.6) + grain[plate]
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        for index, (row, column) in enumerate(BOLTS):
            distance = np.hypot(rows - row - dy, columns - column - dx)
            if index == missing:
                mask |= distance <= BOLT_RADIUS + 1
                continue
            image[distance <= BOLT_RADIUS] = 0.25
            image[(distance > BOLT_RADIUS - 3) & (distance <= BOLT_RADIUS)] = 0.9  # the bolt head's bright rim
            image[distance <= 3] = 0.45  # its centre
        return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask

    def save(array: np.ndarray, path: Path, mode: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).convert(mode).save(path)

    for split, count in (("train/good", n_train), ("test/good", n_test_good)):
        for index in range(count):
            save(render(None)[0], folder / split / f"{index:03d}.png", "RGB")
    for index in range(n_test_missing):
        image, mask = render(int(rng.integers(len(BOLTS))))
        save(image, folder / "test" / "missing_bolt" / f"{index:03d}.png", "RGB")
        save(mask.astype(np.uint8) * 255, folder / "ground_truth" / "missing_bolt" / f"{index:03d}_mask.png", "L")
    (folder / "counts.json").write_text(json.dumps(counts))
    return folder


def _load(paths: list[Path], mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    return torch.stack([decode_image(str(p), mode=mode) for p in paths]).float() / 255


def token_set(root: Path) -> TokenSet:
    """Frozen Lite0 ImageNet features (offline package weights) of a texture folder in MVTec layout."""
    backbone = ADTRModel("tf_efficientnet_lite0", input_size=(SIZE, SIZE), feature_stride=STRIDE).eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([backbone.extract_features((chunk - 0.5) / 0.5) for chunk in images.split(16)])

    train = features(_load(sorted((root / "train" / "good").glob("*.png"))))
    good = sorted((root / "test" / "good").glob("*.png"))
    defects = sorted(p for p in (root / "test").glob("*/*.png") if p.parent.name != "good")
    masks = [_load([root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png"], ImageReadMode.GRAY) for p in defects]
    test = features(_load(good + defects))
    grid = test.shape[-2:]
    anomalous = torch.zeros(len(good) + len(defects), *grid, dtype=torch.bool)
    anomalous[len(good) :] = F.avg_pool2d(torch.cat(masks), STRIDE)[:, 0] >= 0.5
    normal = torch.zeros_like(anomalous)
    normal[: len(good)] = True
    return TokenSet(train, test, anomalous, normal)


def linear(channels: int) -> nn.Conv2d:
    """The plain linear reconstructor of the paper's argument: a 1x1 convolution (PyTorch's default init)."""
    return nn.Conv2d(channels, channels, kernel_size=1)


def attention(channels: int, tokens: int, locality: float = 0.0) -> ADTRReconstructor:
    """ADTR's reconstructor (learnable query), small: 64 wide, one encoder and one decoder layer, no dropout.

    ``locality``: ``attention_locality`` (the recommended recipe's 1 biases every attention towards nearby tokens,
    the token itself included, so it is the arm that could drift toward copying its input).
    """
    return ADTRReconstructor(
        channels, tokens, hidden_dim=64, num_encoder_layers=1, num_decoder_layers=1, num_heads=4, ffn_dim=128,
        dropout=0.0, attention_locality=locality,
    )  # fmt: skip


def train(model: nn.Module, features: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """AdamW on the sum-over-channels squared error, batches of 8 maps; returns the mean loss of the last 10%."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        batch = features[torch.randint(len(features), (8,), generator=generator)]
        loss = (model(batch) - batch).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


@torch.no_grad()
def token_errors(model: nn.Module | None, features: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error per token, ``(M, h, w)``; ``None`` is the zero-output model."""
    if model is None:
        return features.pow(2).sum(1)
    return torch.cat([(model(chunk) - chunk).pow(2).sum(1) for chunk in features.split(16)])


def neighbour_errors(features: torch.Tensor) -> torch.Tensor:
    """Squared error to the mean of the 8 neighbouring tokens: a model that rebuilds a position from around it."""
    kernel = torch.ones(1, 1, 3, 3) / 8
    kernel[0, 0, 1, 1] = 0
    channels = features.shape[1]
    neighbours = F.conv2d(F.pad(features, (1, 1, 1, 1), mode="replicate"), kernel.expand(channels, 1, 3, 3),
                          groups=channels)  # fmt: skip
    return (features - neighbours).pow(2).sum(1)


def position_errors(tokens: TokenSet) -> torch.Tensor:
    """Squared error to the training images' mean token at the same position: what belongs where."""
    return (tokens.test - tokens.train.mean(0, keepdim=True)).pow(2).sum(1)


def score(errors: torch.Tensor, tokens: TokenSet) -> dict[str, float]:
    """Normal and anomalous errors (absolute and relative to feature energy) and the token AUROC."""
    energy = tokens.test.pow(2).sum(1)
    scores = torch.cat([errors[tokens.anomalous], errors[tokens.normal]])
    # Into [0, 1]: torchmetrics squashes scores outside it through a sigmoid, which ties large errors (ranks kept).
    scores = scores / scores.max().clamp_min(torch.finfo(scores.dtype).tiny)
    labels = torch.cat([torch.ones(int(tokens.anomalous.sum())), torch.zeros(int(tokens.normal.sum()))]).int()
    return {
        "normal_error": float(errors[tokens.normal].mean()),
        "anomalous_error": float(errors[tokens.anomalous].mean()),
        "normal_relative": float((errors[tokens.normal] / energy[tokens.normal]).mean()),
        "anomalous_relative": float((errors[tokens.anomalous] / energy[tokens.anomalous]).mean()),
        "token_AUROC": float(binary_auroc(scores, labels)),
    }


def identity_distance(conv: nn.Conv2d) -> float:
    """``||W - I||_F / ||I||_F`` of a 1x1 convolution's weight."""
    weight = conv.weight.detach()[:, :, 0, 0]
    eye = torch.eye(weight.shape[0])
    return float(torch.linalg.matrix_norm(weight - eye) / torch.linalg.matrix_norm(eye))


def best_lr(build: Callable[[], nn.Module], features: torch.Tensor, steps: int, seed: int) -> float:
    """The sweep's learning rate with the lowest final training loss (normal images only)."""
    losses = {}
    for lr in LEARNING_RATES:
        torch.manual_seed(seed)
        losses[lr] = train(build(), features, steps, lr, seed)
    return min(losses, key=losses.get)


def builders(tokens: TokenSet) -> dict[str, Callable[[], nn.Module]]:
    channels, grid = tokens.train.shape[1], tokens.train.shape[-2:]
    return {
        "linear 1x1 conv": lambda: linear(channels),
        "attention + query": lambda: attention(channels, grid.numel()),
        "local attention + query": lambda: attention(channels, grid.numel(), locality=1.0),
    }


def run(texture: str, tokens: TokenSet, steps: int, seed: int, lrs: dict[str, float]) -> list[dict]:
    """Train each reconstructor at its learning rate for ``steps`` and score it, plus the two reference models."""
    rows = []
    for name, build in builders(tokens).items():
        lr = lrs[name]
        torch.manual_seed(seed)
        model = build()
        start = identity_distance(model) if isinstance(model, nn.Conv2d) else float("nan")
        train(model, tokens.train, steps, lr, seed)
        end = identity_distance(model) if isinstance(model, nn.Conv2d) else float("nan")
        rows.append({"reconstructor": name, "lr": lr, "W_minus_I_start": start, "W_minus_I_end": end,
                     **score(token_errors(model, tokens.test), tokens)})  # fmt: skip
    rows.append({"reconstructor": "zero output", **score(token_errors(None, tokens.test), tokens)})
    rows.append({"reconstructor": "copy input", **score(torch.zeros_like(tokens.anomalous, dtype=torch.float), tokens)})
    rows.append({"reconstructor": "neighbour mean", **score(neighbour_errors(tokens.test), tokens)})
    rows.append({"reconstructor": "position mean", **score(position_errors(tokens), tokens)})
    return [{"texture": texture, "seed": seed, "steps": steps, **row} for row in rows]


def report(table: pd.DataFrame) -> str:
    """The README's Markdown table: means over seeds, the token AUROC's range, the linear weight's drift."""
    lines = [
        "| texture | reconstructor | normal error / energy | anomalous error / energy | token AUROC "
        "| ‖W − I‖ / ‖I‖, start → end |",
        "|---|---|---|---|---|---|",
    ]
    shown = table[table["reconstructor"] != "copy input"]  # its errors are all zero: no ratio to show
    for (texture, name), rows in shown.groupby(["texture", "reconstructor"], sort=False):
        auroc = rows["token_AUROC"]
        label = name if pd.isna(rows["lr"].iloc[0]) else f"{name} (lr {rows['lr'].iloc[0]:g})"
        drift = rows[["W_minus_I_start", "W_minus_I_end"]].mean()
        cells = [
            texture,
            label,
            f"{rows['normal_relative'].mean():.3f}",
            f"{rows['anomalous_relative'].mean():.3f}",
            f"{auroc.mean():.3f} ({auroc.min():.3f}–{auroc.max():.3f})",
            "" if drift.isna().any() else f"{drift.iloc[0]:.3f} → {drift.iloc[1]:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--textures", nargs="+", default=["brick", "grass"], choices=["brick", "grass", "gravel", "part"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps for every reconstructor")
    parser.add_argument("--data", type=Path, default=Path("datasets/identity_shortcut"), help="where textures go")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/identity_shortcut.csv"))
    parser.add_argument("--report", action="store_true", help="only write the Markdown table of --output again")
    args = parser.parse_args()
    if args.report:
        args.output.with_suffix(".md").write_text(report(pd.read_csv(args.output)))
        return
    rows = []
    for texture in args.textures:
        root = (
            make_part_dataset(args.data)
            if texture == "part"
            else make_texture_dataset(args.data, texture, image_size=SIZE, n_train=48, n_test_good=12,
                                      n_test_defect_per_type=4)
        )  # fmt: skip
        tokens = token_set(root)
        # The sweep runs once per texture, on the first seed: the same rate then serves every seed.
        candidates = builders(tokens)
        lrs = {name: best_lr(build, tokens.train, args.steps, args.seeds[0]) for name, build in candidates.items()}
        for seed in args.seeds:
            rows += run(texture, tokens, args.steps, seed, lrs)
    table = pd.DataFrame(rows).assign(**provenance())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    args.output.with_suffix(".md").write_text(report(table))
    columns = ["normal_relative", "anomalous_relative", "token_AUROC", "W_minus_I_start", "W_minus_I_end"]
    summary = table.groupby(["texture", "reconstructor"], sort=False)[columns].agg(["mean", "min", "max"])
    print(summary.round(3).to_string())


if __name__ == "__main__":
    main()
