"""Learning curves of ADTR training recipes on real data: which lever buys what, per epoch and per second.

Every recipe trains the package's own reconstructor (``ADTRReconstructor``), loss, learning-rate schedule and
anomaly map on the frozen Lite0 features of each data set, and is tested after the epochs in ``--eval-epochs``:
pixel AUROC, pixel AUPRO (30% FPR) and image AUROC for several image scores. The backbone features are computed
once per data set (what ``cache_features`` does inside ADTR), so the curves measure the transformer alone; the
seconds are training seconds only. Written by hand rather than through ``Engine`` because Lightning would test a
model once per fit, and a curve needs the test metrics at many points of one run.

Rows are appended to ``--output`` as they finish (the file is never rewritten); a run already there with the
same settings is skipped, so a stopped ablation resumes. ``benchmarks/plot_convergence.py`` draws the curves
with PaDiM and PatchCore (from ``adtr-anomalib benchmark --config configs/benchmark/peers.yaml``) as lines.

    python benchmarks/convergence.py --datasets bsdata --recipes fast fast_full_map --seeds 0 1 --eval-epochs 3 6
    python benchmarks/convergence.py --datasets brick grass gravel --recipes fast --seeds 0 1 --eval-epochs 4 8
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.metrics import AUPRO
from anomalib.models.image.padim.anomaly_map import AnomalyMapGenerator as PadimMapGenerator
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

from adtr_anomalib import ADTR
from adtr_anomalib.benchmark import measure
from adtr_anomalib.benchmark.report import append_csv
from adtr_anomalib.data import default_dataset_root, make_texture_dataset, mvtec_layout_folder
from adtr_anomalib.models.adtr.anomaly_map import AnomalyMapGenerator
from adtr_anomalib.models.adtr.components import DEFAULT_LAYERS, ADTRReconstructor, per_pixel_statistics
from adtr_anomalib.models.adtr.components.settings import RECIPES
from adtr_anomalib.models.adtr.components.training import lr_scheduler, native_bf16
from adtr_anomalib.models.adtr.loss import ADTRLoss
from adtr_anomalib.models.adtr.torch_model import ADTRModel

BACKBONE = "tf_efficientnet_lite0"
SHARED_DATA = Path(os.environ.get("ADTR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# Surfaces (BSData pitting, the built-in textures) and an object with global structure (juice bottles whose defects
# are missing, extra or misplaced labels and wrong fill levels: MVTec LOCO, in the shared data folder).
DATASETS = {
    "bsdata": "bsdata_pitting",
    "brick": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "juice": "juice_bottle_logical",
}
SHARED_SETS = {"bsdata", "juice"}


@dataclass(frozen=True)
class Recipe:
    """One training recipe: the ADTR arguments that it sets (the rest are the paper's)."""

    dropout: float = 0.1
    lr: float = 1e-4
    lr_schedule: str = "step"
    warmup_steps: int = 0
    gradient_clip_val: float | None = None
    feature_jitter: float = 0.0
    normalize_features: bool = False
    layers: tuple[str, ...] = DEFAULT_LAYERS
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    loss_reduction: str = "sum"
    batch_size: int = 16
    image_size: int = 256
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    feature_stride: int = 16
    patch_size: int = 1
    map_layers: tuple[str, ...] | None = None
    normalize_map: bool = False
    # Fraction of the training images held back from training, as anomalib's synthetic validation split does
    # (10%, half of them kept normal): the map statistics are then also fitted on those normal images alone.
    holdout: float = 0.0
    attention_dropout: str = "weights"
    reconstructor: str = "transformer"
    neighbor_mask: int = 0
    attention_locality: float = 0.0
    # Epochs the learning-rate schedule spans (0: the run's last test epoch); the run itself trains to its last test.
    schedule_epochs: int = 0

    def __post_init__(self) -> None:
        if self.map_layers is not None:  # RECIPES hold lists; a tuple keeps the dataclass hashable and its repr stable
            object.__setattr__(self, "map_layers", tuple(self.map_layers))


# Fields added after the first rows were written: left out of a row's settings while at these defaults, so the
# runs recorded before them still match (and are not run again).
LATER_FIELDS = {
    "feature_stride": 16,
    "patch_size": 1,
    "map_layers": None,
    "normalize_map": False,
    "holdout": 0.0,
    "attention_dropout": "weights",
    "reconstructor": "transformer",
    "neighbor_mask": 0,
    "attention_locality": 0.0,
    "schedule_epochs": 0,
}


FAST = Recipe(**RECIPES["fast"])  # the package's "fast" recipe, as ADTR(recipe="fast") trains
# The recipe before map_layers and normalize_map (its pixel map sums every stage, unstandardised): the ablation arms
# below were run from it. Its *_no32_posz and image *_posz columns are the maps of "fast" (the same training).
FULL_MAP = replace(FAST, map_layers=None, normalize_map=False)
RECIPES_TRIED: dict[str, Recipe] = {
    "paper": Recipe(),
    # The paper's recipe with whole keys dropped instead of single attention weights (fused attention): same
    # accuracy per step, at a cheaper step?
    "paper_keys": Recipe(attention_dropout="keys"),
    "paper_no_dropout": Recipe(dropout=0.0),  # the control: how much dropout itself changes these runs
    "fast": FAST,
    "fast_full_map": FULL_MAP,
    "fast_no_norm": replace(FULL_MAP, normalize_features=False),  # what normalize_features buys
    "fast_no_jitter": replace(FULL_MAP, feature_jitter=0.0),  # what the feature jitter buys
    "fast_s16": replace(FULL_MAP, layers=DEFAULT_LAYERS[:4]),  # without the stride-32 stage, also as input
    "fast_2x2": replace(FULL_MAP, num_encoder_layers=2, num_decoder_layers=2),  # half the depth
    # A stride-8 map at stride-16 attention cost: each token reconstructs a 2x2 block of stride-8 positions.
    "fast_s8p2": replace(FULL_MAP, feature_stride=8, patch_size=2),
    "fast_s8p2_no32": replace(FULL_MAP, feature_stride=8, patch_size=2, layers=DEFAULT_LAYERS[:4]),  # both
    # The fast recipe (pixel map without stride 32, standardised per pixel) on a stride-8 map grid: the package's
    # "fast_stride8" recipe (the arm keeps its first name so that the runs recorded under it still match).
    "fast_s8p2_posz": Recipe(**RECIPES["fast_stride8"]),
    # The paper's Table 4 "without attention" on the recommended recipe: the encoder's and decoder's feed-forward
    # blocks alone, each token reconstructed on its own (as PaDiM and PatchCore score each patch on its own).
    "fast_stride8_mlp": Recipe(**RECIPES["fast_stride8_mlp"]),
    # UniAD's neighbourhood mask on the recommended recipe: no token attends to the tokens around its own position
    # (a 3x3 or 7x7 block of the 16x16 tokens), so it is rebuilt from its surroundings, not from itself.
    "fast_stride8_nm3": Recipe(**RECIPES["fast_stride8"], neighbor_mask=3),  # type: ignore[arg-type]
    "fast_stride8_nm7": Recipe(**RECIPES["fast_stride8"], neighbor_mask=7),  # type: ignore[arg-type]
    # The opposite: attention biased towards the tokens near the query's position (a squared-distance penalty of 1
    # per squared token step on every logit), while the decoder still starts from the learnable query.
    "fast_stride8_local1": Recipe(**RECIPES["fast_stride8"], attention_locality=1.0),  # type: ignore[arg-type]
    # The same on a 4x longer cosine schedule (24 epochs): does it keep improving, or learn to copy its input
    # (local attention sees each token itself) as a user who trains longer, e.g. on a GPU, would find?
    "fast_stride8_local1_24ep": Recipe(**RECIPES["fast_stride8"], attention_locality=1.0, schedule_epochs=24),  # type: ignore[arg-type]
    # Controls that learn nothing, scored with the recommended recipe's normalisations and maps (epoch 0): the
    # reconstruction is the training features' mean at each position ("mean"), or zero ("zero": the map is the
    # standardised features' norm). A trained reconstructor has to beat these to have learned anything.
    "fast_stride8_mean": Recipe(**{**RECIPES["fast_stride8"], "reconstructor": "mean"}),  # type: ignore[arg-type]
    "fast_stride8_zero": Recipe(**{**RECIPES["fast_stride8"], "reconstructor": "zero"}),  # type: ignore[arg-type]
    # Map statistics from normal images the model never trained on (*_held columns) against the training images'.
    "fast_holdout": replace(FULL_MAP, holdout=0.1),
}
CONTROLS = ("mean", "zero")  # the reconstructors of the controls, which train nothing
# Image scores compared on the same maps: the paper's max of the 16x16-average-pooled map, and alternatives.
SCORES = ("pool16_max", "pool32_max", "top1pct_mean", "max")


def image_scores(anomaly_map: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each candidate image score of ``(B, 1, H, W)`` maps."""
    flat = anomaly_map.flatten(1)
    k = max(1, flat.shape[1] // 100)
    return {
        "pool16_max": AnomalyMapGenerator(16).compute_score(anomaly_map),
        "pool32_max": AnomalyMapGenerator(32).compute_score(anomaly_map),
        "top1pct_mean": flat.topk(k, dim=1).values.mean(dim=1),
        "max": flat.amax(dim=1),
    }


@dataclass
class Split:
    features: torch.Tensor  # (N, C, h, w)
    labels: torch.Tensor | None = None  # (N,)
    masks: torch.Tensor | None = None  # (N, H, W) bool
    stage_channels: tuple[int, ...] = ()  # channels of each backbone stage, in the order of the recipe's layers


def dataset_root(name: str) -> Path:
    if name in SHARED_SETS:
        return SHARED_DATA / DATASETS[name]
    return make_texture_dataset(default_dataset_root(), name)


def load_images(
    root: Path, image_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pre-processed train batches, test batches, test labels and test masks (resized like anomalib does)."""
    datamodule = mvtec_layout_folder(root, train_batch_size=32, eval_batch_size=32)
    datamodule.setup()
    transform = ADTR.configure_pre_processor((image_size, image_size), backbone=BACKBONE).transform
    train = [transform(batch.image) for batch in datamodule.train_dataloader()]
    test, labels, masks = [], [], []
    for batch in datamodule.test_dataloader():
        test.append(transform(batch.image))
        labels.append(batch.gt_label.int())
        mask = batch.gt_mask.float().reshape(len(batch.image), 1, *batch.gt_mask.shape[-2:])
        masks.append(F.interpolate(mask, size=(image_size, image_size), mode="nearest")[:, 0].bool())
    return train, test, torch.cat(labels), torch.cat(masks)


def extract(model: ADTRModel, batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([model.extract_features(batch.to(device)) for batch in batches])


def features_for(name: str, recipe: Recipe, cache: dict, device: torch.device | None = None) -> tuple[Split, Split]:
    """Train and test features of data set ``name`` for the recipe's backbone settings (computed once).

    The features, labels and masks live on ``device`` (CPU by default), where the recipe then trains and is tested.
    """
    device = device or torch.device("cpu")
    key = (name, recipe.layers, recipe.image_size, recipe.normalize_features, recipe.feature_stride)
    if key not in cache:
        image_key = (name, recipe.image_size)
        if image_key not in cache:
            cache[image_key] = load_images(dataset_root(name), recipe.image_size)
        train, test, labels, masks = cache[image_key]
        model = ADTRModel(
            backbone=BACKBONE,
            layers=recipe.layers,
            input_size=(recipe.image_size, recipe.image_size),
            feature_stride=recipe.feature_stride,
            normalize_features=recipe.normalize_features,
        ).eval()
        model.to(device)
        raw = [model.backbone_features(batch.to(device)) for batch in train]  # one backbone pass, as ADTR's fit does
        if recipe.normalize_features:
            model.fit_feature_statistics(raw)
        stages = tuple(model.feature_extractor.out_dims)
        train_features = torch.cat([model.standardize(features) for features in raw])
        test_split = Split(extract(model, test, device), labels.to(device), masks.to(device), stages)
        cache[key] = (Split(train_features), test_split)
    return cache[key]


def evaluate(
    reconstructor: ADTRReconstructor,
    test: Split,
    recipe: Recipe,
    train: Split,
    held: Split | None = None,
    *,
    light: bool = False,
) -> dict[str, float]:
    """Test metrics of the current reconstructor, maps min-max scaled to [0, 1] (the metrics are rank-based).

    The pixel map sums the channels of ``recipe.map_layers`` (all stages when ``None``); the image scores use the
    map of all stages, as ``ADTRModel`` does. A map of all five stages is also scored without the stride-32
    stage's channels (``*_no32`` columns): the same model, only the channels summed into the distance differ.
    Two candidate map normalisations fitted on the training features are scored beside (same model, no
    retraining): ``*_whiten`` divides each channel's difference by its RMS over the training set, so channels
    that are hard to reconstruct on normal images stop dominating the distance; ``*_posz`` standardises the
    map at every pixel with the mean and standard deviation of the training maps there (ADTR's ``normalize_map``),
    a per-position prior like PaDiM's for aligned parts. With ``held`` (normal images left out of training), the
    ``*_posz`` maps are also standardised with the statistics of those images' maps (``*_posz_held`` columns).
    """
    reconstructor.eval()
    starts = [0, *itertools.accumulate(test.stage_channels)]
    map_layers = recipe.map_layers or recipe.layers
    keep = [c for i, layer in enumerate(recipe.layers) if layer in map_layers for c in range(starts[i], starts[i + 1])]
    no32 = None
    if len(map_layers) == len(DEFAULT_LAYERS):  # the last stage is the stride-32 one
        no32 = list(range(starts[-2]))
    with torch.no_grad():
        rms = residual_rms(reconstructor, train)
        priors = {"": fit_prior(reconstructor, train, keep, no32, recipe.image_size, rms)}
        if held is not None:
            priors["_held"] = fit_prior(reconstructor, held, keep, no32, recipe.image_size)
        maps: dict[str, list[torch.Tensor]] = defaultdict(list)
        for chunk in test.features.split(32):
            difference = chunk - reconstructor(chunk)
            whitened = difference / rms[:, None, None]
            maps["all"].append(norm_map(difference, recipe.image_size))
            maps["pixel"].append(norm_map(difference[:, keep], recipe.image_size))
            maps["all_whiten"].append(norm_map(whitened, recipe.image_size))
            maps["pixel_whiten"].append(norm_map(whitened[:, keep], recipe.image_size))
            if no32 is not None:
                maps["no32"].append(norm_map(difference[:, no32], recipe.image_size))
    reconstructor.train()
    maps = {k: torch.cat(v) for k, v in maps.items()}
    for source, prior in priors.items():
        for name, (mean, std) in prior.items():
            maps[f"{name}_posz{source}"] = (maps[name] - mean) / std
    standardised = "_posz" if recipe.normalize_map else ""  # the recipe's own maps give the main columns
    pixel = map_metrics(maps[f"pixel{standardised}"], test)
    metrics = {**map_metrics(maps[f"all{standardised}"], test), **{k: pixel[k] for k in ("pixel_AUROC", "pixel_AUPRO")}}
    if no32 is not None:
        variant = map_metrics(maps["no32"], test)
        metrics.update({f"{name}_no32": variant[name] for name in ("pixel_AUROC", "pixel_AUPRO")})
        metrics["image_AUROC_no32_pool16_max"] = variant["image_AUROC_pool16_max"]
        variant = map_metrics(maps["no32_posz"], test)
        metrics.update({f"{name}_no32_posz": variant[name] for name in ("pixel_AUROC", "pixel_AUPRO")})
    if recipe.normalize_map:  # the same model's maps without the per-pixel standardisation, and half of each
        for name in ("pixel", "all"):
            # The raw map standardised by one mean and deviation over every pixel of the training maps keeps where
            # normal images err most; averaged with the per-pixel z-score it weighs both views equally.
            mean, std = priors[""][name]
            overall = mean.mean()
            spread = ((std.pow(2) + mean.pow(2)).mean() - overall.pow(2)).clamp_min(1e-12).sqrt()
            maps[f"{name}_blend"] = (maps[f"{name}_posz"] + (maps[name] - overall) / spread) / 2
        for variant, (pixel_map, image_map) in {"raw": ("pixel", "all"), "blend": ("pixel_blend", "all_blend")}.items():
            pixel, image = map_metrics(maps[pixel_map], test), map_metrics(maps[image_map], test, pixel=False)
            metrics.update({f"{k}_{variant}": pixel[k] for k in ("pixel_AUROC", "pixel_AUPRO")})
            metrics[f"image_AUROC_{variant}_pool16_max"] = image["image_AUROC_pool16_max"]
    for suffix in ("whiten", "posz", "whiten_posz"):
        pixel = map_metrics(maps[f"pixel_{suffix}"], test)
        image = map_metrics(maps[f"all_{suffix}"], test, pixel=False)
        metrics.update({f"pixel_AUROC_{suffix}": pixel["pixel_AUROC"], f"pixel_AUPRO_{suffix}": pixel["pixel_AUPRO"]})
        metrics[f"image_AUROC_{suffix}_pool16_max"] = image["image_AUROC_pool16_max"]
    if light:  # the maps alone: the recipe's own, whitened, standardised per pixel, both
        return metrics
    if recipe.holdout:
        metrics.update(stage_standardised_metrics(reconstructor, test, recipe, train, no32))
    metrics.update(blurred_metrics(maps[f"{'no32' if no32 is not None else 'pixel'}{standardised}"], test))
    metrics.update(fused_metrics(maps, test, train, keep, recipe.image_size))
    if held is not None:
        pixel = map_metrics(maps["no32_posz_held" if no32 is not None else "pixel_posz_held"], test)
        image = map_metrics(maps["all_posz_held"], test, pixel=False)
        metrics.update({f"{k}_posz_held": pixel[k] for k in ("pixel_AUROC", "pixel_AUPRO")})
        metrics["image_AUROC_posz_held_pool16_max"] = image["image_AUROC_pool16_max"]
    return metrics


def fused_metrics(
    maps: dict[str, torch.Tensor], test: Split, train: Split, keep: list[int], image_size: int
) -> dict[str, float]:
    """``*_fused_mean``, ``*_fused_zero`` columns: the trained map averaged with a control's, both z-scored per pixel.

    The controls learn nothing (see :func:`control_row`): the distance of each standardised feature to the training
    features' mean at its position (``mean``, a diagonal PaDiM), or its norm (``zero``). Averaging z-scores weighs
    the two maps equally; it asks whether what the reconstruction adds and what the normalisations alone find are
    different evidence. Pixel columns use the pixel map's channels, the image column all channels.
    """
    metrics: dict[str, float] = {}
    for name in CONTROLS:
        control = control_reconstruction(name, train)
        with torch.no_grad():
            prior = fit_prior(control, train, keep, None, image_size)  # type: ignore[arg-type]
            control_maps = split_maps(control, test, keep, None, image_size)
        fused = {}
        for kind, batches in control_maps.items():
            control_mean, control_std = prior[kind]
            fused[kind] = (maps[f"{kind}_posz"] + (torch.cat(batches) - control_mean) / control_std) / 2
        pixel = map_metrics(fused["pixel"], test)
        image = map_metrics(fused["all"], test, pixel=False)
        metrics[f"pixel_AUROC_fused_{name}"] = pixel["pixel_AUROC"]
        metrics[f"pixel_AUPRO_fused_{name}"] = pixel["pixel_AUPRO"]
        metrics[f"image_AUROC_fused_{name}_pool16_max"] = image["image_AUROC_pool16_max"]
    return metrics


# Gaussian smoothing of the final pixel map, as anomalib's PaDiM and PatchCore apply to theirs (sigma 4 there).
BLUR_SIGMAS = (2, 4)


def blurred_metrics(pixel_map: torch.Tensor, test: Split) -> dict[str, float]:
    """``*_blur<sigma>`` columns: the recipe's pixel map smoothed by PaDiM's own Gaussian blur at each sigma."""
    metrics = {}
    for sigma in BLUR_SIGMAS:
        blur = PadimMapGenerator(sigma=sigma).blur.to(pixel_map.device)
        smoothed = torch.cat([blur(chunk) for chunk in pixel_map.split(32)])
        pixel = map_metrics(smoothed, test)
        metrics[f"pixel_AUROC_blur{sigma}"] = pixel["pixel_AUROC"]
        metrics[f"pixel_AUPRO_blur{sigma}"] = pixel["pixel_AUPRO"]
    return metrics


def stage_maps(reconstructor: ADTRReconstructor, split: Split, image_size: int) -> list[torch.Tensor]:
    """One ADTR map per backbone stage (L2 over that stage's channels), each ``(N, 1, H, W)``."""
    starts = [0, *itertools.accumulate(split.stage_channels)]
    maps: list[list[torch.Tensor]] = [[] for _ in split.stage_channels]
    with torch.no_grad():
        for chunk in split.features.split(32):
            difference = chunk - reconstructor(chunk)
            for stage, (first, last) in enumerate(itertools.pairwise(starts)):
                maps[stage].append(norm_map(difference[:, first:last], image_size))
    return [torch.cat(stage) for stage in maps]


def stage_standardised_metrics(
    reconstructor: ADTRReconstructor, test: Split, recipe: Recipe, train: Split, no32: list[int] | None
) -> dict[str, float]:
    """``*_stagez`` columns: every stage's map standardised per pixel on its own, then averaged over the stages.

    Against ``*_posz`` (one map of all channels, then standardised) this weights the stages equally in the map
    instead of by the size of their reconstruction errors. Pixel columns average the pixel map's stages (without
    the stride-32 stage when the recipe's map would have it), the image column all stages.
    """
    reconstructor.eval()
    train = replace(train, stage_channels=test.stage_channels)
    train_stages = stage_maps(reconstructor, train, recipe.image_size)
    test_stages = stage_maps(reconstructor, test, recipe.image_size)
    reconstructor.train()
    standardised = []
    for train_map, test_map in zip(train_stages, test_stages, strict=True):
        mean, std = per_pixel_statistics(train_map.split(32))
        standardised.append((test_map - mean) / std)
    pixel_stages = standardised[:-1] if no32 is not None else standardised
    pixel = map_metrics(torch.stack(pixel_stages).mean(dim=0), test)
    image = map_metrics(torch.stack(standardised).mean(dim=0), test, pixel=False)
    return {
        "pixel_AUROC_stagez": pixel["pixel_AUROC"],
        "pixel_AUPRO_stagez": pixel["pixel_AUPRO"],
        "image_AUROC_stagez_pool16_max": image["image_AUROC_pool16_max"],
    }


def fit_prior(
    reconstructor: ADTRReconstructor,
    split: Split,
    keep: list[int],
    no32: list[int] | None,
    image_size: int,
    rms: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-pixel mean and std of the maps (all stages, pixel-map stages, without stride 32) of ``split``'s images;
    with ``rms``, also of the channel-whitened maps (``all_whiten``, ``pixel_whiten``)."""
    maps = split_maps(reconstructor, split, keep, no32, image_size, rms)
    return {name: per_pixel_statistics(batches) for name, batches in maps.items()}


def split_maps(
    reconstructor: torch.nn.Module,
    split: Split,
    keep: list[int],
    no32: list[int] | None,
    image_size: int,
    rms: torch.Tensor | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Batches of ``split``'s maps: all stages (``all``), the pixel map's stages (``pixel``), without stride 32,
    and with ``rms`` the first two of the difference divided by each channel's RMS (``*_whiten``)."""
    maps: dict[str, list[torch.Tensor]] = defaultdict(list)
    for chunk in split.features.split(32):
        difference = chunk - reconstructor(chunk)
        maps["all"].append(norm_map(difference, image_size))
        maps["pixel"].append(norm_map(difference[:, keep], image_size))
        if no32 is not None:
            maps["no32"].append(norm_map(difference[:, no32], image_size))
        if rms is not None:
            whitened = difference / rms[:, None, None]
            maps["all_whiten"].append(norm_map(whitened, image_size))
            maps["pixel_whiten"].append(norm_map(whitened[:, keep], image_size))
    return maps


def residual_rms(reconstructor: ADTRReconstructor, train: Split) -> torch.Tensor:
    """Root-mean-square reconstruction error of every channel over the training features, ``(C,)``."""
    total = torch.zeros(train.features.shape[1], dtype=torch.float64, device=train.features.device)
    for chunk in train.features.split(32):
        total += (chunk - reconstructor(chunk)).double().pow(2).sum(dim=(0, 2, 3))
    count = train.features.shape[0] * train.features.shape[2] * train.features.shape[3]
    return (total / count).sqrt().clamp_min(1e-6).float()


def norm_map(difference: torch.Tensor, image_size: int) -> torch.Tensor:
    """The ADTR map of a feature difference: L2 over channels, up-sampled to the image."""
    generator = AnomalyMapGenerator()
    return generator.compute_anomaly_map(difference, torch.zeros_like(difference), (image_size, image_size))


def map_metrics(maps: torch.Tensor, test: Split, *, pixel: bool = True) -> dict[str, float]:
    """Pixel AUROC, pixel AUPRO (30% FPR) and image AUROC of every image score for ``(N, 1, H, W)`` maps."""
    maps = (maps - maps.min()) / (maps.max() - maps.min()).clamp_min(1e-12)
    if not pixel:
        return {f"image_AUROC_{name}": float(binary_auroc(s, test.labels)) for name, s in image_scores(maps).items()}
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3, strict=False)
    aupro.update(SimpleNamespace(anomaly_map=maps[:, 0], gt_mask=test.masks))
    metrics = {
        "pixel_AUROC": float(binary_auroc(maps[:, 0].flatten(), test.masks.flatten().int())),
        "pixel_AUPRO": float(aupro.compute()),
    }
    for score_name, scores in image_scores(maps).items():
        metrics[f"image_AUROC_{score_name}"] = float(binary_auroc(scores, test.labels))
    return metrics


class FixedReconstruction(torch.nn.Module):
    """A control's "reconstruction" that learns nothing: one ``(1, C, h, w)`` tensor for every image."""

    def __init__(self, reconstruction: torch.Tensor) -> None:
        super().__init__()
        self.reconstruction = reconstruction

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.reconstruction.expand_as(features)


def control_reconstruction(kind: str, train: Split) -> FixedReconstruction:
    """A control of :data:`CONTROLS`: the training features' mean at each position (``"mean"``), or zero."""
    mean = train.features.mean(dim=0, keepdim=True)
    return FixedReconstruction(mean if kind == "mean" else torch.zeros_like(mean))


def control_row(recipe: Recipe, train: Split, test: Split) -> Iterator[dict[str, Any]]:
    """The one row (epoch 0) of a control: the training features' mean at each position, or zero."""
    control = control_reconstruction(recipe.reconstructor, train)
    loss = ADTRLoss(reduction=recipe.loss_reduction)(train.features, control(train.features))
    metrics = evaluate(control, test, recipe, train)  # type: ignore[arg-type]
    print("  epoch   0 " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
    yield {"epoch": 0, "train_seconds": 0.0, "loss": float(loss), **metrics}


def train_curve(
    recipe: Recipe,
    train: Split,
    test: Split,
    seed: int,
    eval_epochs: list[int],
    time_limit: float | None = None,
    eval_steps: list[int] | None = None,
    light: bool = False,
) -> Iterator[dict[str, Any]]:
    """Train one reconstructor for ``max(eval_epochs)`` epochs; test it after each epoch in ``eval_epochs``.

    With ``eval_steps``, the run is ``max(eval_steps)`` optimiser steps long instead (the schedule spans them, as
    a step budget's does) and is tested after each of those steps. ``light`` tests only the maps (see
    :func:`evaluate`).

    Yields each test's row as soon as it is measured, so a run cut short (a capped stage on a loaned GPU) keeps the
    rows it has. With ``time_limit``, training stops after the first epoch that ends past that many training seconds,
    and that epoch is tested: the curve ends early, on the schedule of the full length (a long recipe's curve within
    a fixed budget of device time).
    """
    if recipe.reconstructor in CONTROLS:
        yield from control_row(recipe, train, test)
        return
    torch.manual_seed(seed)
    held = None
    if recipe.holdout:
        order = torch.randperm(len(train.features), generator=torch.Generator().manual_seed(seed))
        count = round(recipe.holdout * len(order))
        held = Split(train.features[order[: count // 2]])  # the normal half of a synthetic validation split
        train = replace(train, features=train.features[order[count:]])
    num_images, channels, height, width = train.features.shape
    reconstructor = ADTRReconstructor(
        in_channels=channels,
        num_tokens=(height // recipe.patch_size) * (width // recipe.patch_size),
        num_encoder_layers=recipe.num_encoder_layers,
        num_decoder_layers=recipe.num_decoder_layers,
        dropout=recipe.dropout,
        feature_jitter=recipe.feature_jitter,
        patch_size=recipe.patch_size,
        attention_dropout=recipe.attention_dropout,  # type: ignore[arg-type]
        kind=recipe.reconstructor,  # type: ignore[arg-type]
        neighbor_mask=recipe.neighbor_mask,
        attention_locality=recipe.attention_locality,
    ).to(train.features.device)
    bf16 = native_bf16(train.features.device)  # as ADTR's `bf16=True`: only where the device computes bf16 natively
    loss_fn = ADTRLoss(reduction=recipe.loss_reduction)
    optimizer = torch.optim.AdamW(reconstructor.parameters(), lr=recipe.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(num_images / recipe.batch_size)
    if eval_steps:
        schedule = max(eval_steps)
        epochs = math.ceil(schedule / steps_per_epoch)
    else:
        epochs = max(eval_epochs)
        schedule = steps_per_epoch * (recipe.schedule_epochs or epochs)
    scheduler = lr_scheduler(optimizer, recipe.lr_schedule, schedule, recipe.warmup_steps)
    generator = torch.Generator().manual_seed(seed)
    seconds = 0.0
    step = 0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        for index in torch.randperm(num_images, generator=generator).split(recipe.batch_size):
            if eval_steps and step >= schedule:
                break
            features = train.features[index]
            with torch.autocast(train.features.device.type, dtype=torch.bfloat16, enabled=bf16):
                reconstruction = reconstructor(features)
            loss = loss_fn(features, reconstruction.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.gradient_clip_val is not None:
                torch.nn.utils.clip_grad_norm_(reconstructor.parameters(), recipe.gradient_clip_val)
            optimizer.step()
            scheduler.step()
            step += 1
            if eval_steps and step in eval_steps:
                seconds += time.perf_counter() - started
                yield test_row(reconstructor, test, recipe, train, held, light, epoch, step, seconds, loss)
                started = time.perf_counter()
        if eval_steps:
            seconds += time.perf_counter() - started
            continue
        seconds += time.perf_counter() - started
        over = time_limit is not None and seconds > time_limit and epoch < epochs
        if epoch in eval_epochs or over:
            yield test_row(reconstructor, test, recipe, train, held, light, epoch, step, seconds, loss)
        if over:
            print(f"  stopped after epoch {epoch}: over the --time-limit of {time_limit:.0f} s", flush=True)
            return


def test_row(
    reconstructor: ADTRReconstructor,
    test: Split,
    recipe: Recipe,
    train: Split,
    held: Split | None,
    light: bool,
    epoch: int,
    step: int,
    seconds: float,
    loss: torch.Tensor,
) -> dict[str, Any]:
    """The results row of one test of a run in training, printed as it is measured."""
    metrics = evaluate(reconstructor, test, recipe, train, held, light=light)
    print(
        f"  epoch {epoch:3d} step {step:5d} {seconds:7.0f} s  " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
        flush=True,
    )
    return {"epoch": epoch, "step": step, "train_seconds": round(seconds, 1), "loss": float(loss.detach()), **metrics}


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """What a results row records of its recipe (fields added later only where they differ from their default)."""
    return {k: v for k, v in asdict(recipe).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def run_settings(
    recipe: Recipe, eval_epochs: list[int], device: torch.device, eval_steps: list[int] | None = None
) -> str:
    """A run's ``settings`` column, by which a stopped ablation knows the runs it already has.

    Runs on a GPU are told apart from CPU runs of the same recipe (bf16 there, other numbers); CPU runs keep the
    form of the rows written before the device existed, so those still match.
    """
    on = {} if device.type == "cpu" else {"device": device.type}
    when = {"eval_steps": eval_steps} if eval_steps else {"eval_epochs": eval_epochs}
    return repr({**recipe_settings(recipe), **when, **on})


def provenance(device: torch.device) -> dict[str, str]:
    """The benchmark's provenance, with the training device and precision (bf16 where it computes it natively)."""
    stamp = measure.provenance()
    precision = "bf16" if native_bf16(device) else "fp32"
    where = "" if device.type == "cpu" else f" on {device.type}"
    return {**stamp, "machine": f"{stamp['machine']}, {precision} training{where}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES_TRIED), choices=list(RECIPES_TRIED))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--eval-epochs", nargs="+", type=int, default=[2, 4, 6, 8, 12])
    parser.add_argument(
        "--eval-steps",
        nargs="+",
        type=int,
        default=None,
        help="train max(STEPS) optimiser steps (the schedule spans them) and test after each; replaces --eval-epochs",
    )
    parser.add_argument(
        "--light", action="store_true", help="test the maps only: no fused, blurred or per-stage columns (faster)"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/convergence.csv"))
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train runs the file already has again (e.g. for columns added since; a run cut short is always run "
        "again); summaries use the latest",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="end a run after the first epoch past this many training seconds, tested there (its rows stop there)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where features are computed and recipes train, e.g. cuda (bf16 there)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_epochs = sorted(set(args.eval_epochs))
    eval_steps = sorted(set(args.eval_steps)) if args.eval_steps else None
    last = ("step", max(eval_steps)) if eval_steps else ("epoch", max(eval_epochs))
    done = finished_runs(args.output, last[1], args.time_limit, column=last[0])
    cache: dict = {}
    for dataset in args.datasets:
        for recipe_name in args.recipes:
            recipe = RECIPES_TRIED[recipe_name]
            settings = run_settings(recipe, eval_epochs, device, eval_steps)
            for seed in args.seeds:
                if not args.rerun and (dataset, recipe_name, str(seed), settings) in done:
                    continue
                print(f"{dataset} {recipe_name} seed {seed}", flush=True)
                train, test = features_for(dataset, recipe, cache, device)
                rows = train_curve(recipe, train, test, seed, eval_epochs, args.time_limit, eval_steps, args.light)
                for row in rows:
                    write_rows(args.output, dataset, recipe_name, seed, settings, [row], device)


def finished_runs(
    path: Path, last_epoch: int, time_limit: float | None, column: str = "epoch"
) -> set[tuple[str, str, str, str]]:
    """(dataset, recipe, seed, settings) of the runs in ``path`` that ended: tested at ``last_epoch`` (a control at
    epoch 0; with ``column="step"``, the last step), or stopped by ``time_limit``. A run cut short before either
    (a capped stage) is not among them, so the next invocation trains it again; summaries then use its latest
    rows."""
    if not path.exists():
        return set()
    ends: dict[tuple[str, str, str, str], bool] = defaultdict(bool)
    with path.open(newline="") as handle:
        for r in csv.DictReader(handle):
            ended = int(r["epoch"]) == 0 or str(r.get(column) or "") == str(last_epoch)
            stopped = time_limit is not None and float(r["train_seconds"]) > time_limit
            key = (r["dataset"], r["recipe"], r["seed"], r["settings"])
            ends[key] = ends[key] or ended or stopped
    return {key for key, ended in ends.items() if ended}


def write_rows(
    path: Path,
    dataset: str,
    recipe: str,
    seed: int,
    settings: str,
    rows: list[dict[str, Any]],
    device: torch.device | None = None,
) -> None:
    """Append one run's rows; earlier rows keep their values (new columns are added to the header)."""
    stamp = provenance(device or torch.device("cpu"))
    head = {"dataset": dataset, "recipe": recipe, "seed": seed}
    records = [{**head, **row, **stamp, "settings": settings} for row in rows]
    append_csv(records, path)


if __name__ == "__main__":
    main()
