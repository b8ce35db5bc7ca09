"""ADTR's settings in one object, the named recipes that change them, and how the two combine.

The backbone, its layers and weights stay constructor arguments, as in anomalib's other models; everything the paper
tunes (transformer sizes, attention, maps, optimiser) is a field of :class:`ADTRSettings`, so a user picks a recipe
and changes only the fields that matter to them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .backbone import DEFAULT_LAYERS
from .reconstructor import ReconstructorKind
from .transformer import AttentionDropout

LossReduction = Literal["sum", "mean"]
LRSchedule = Literal["step", "cosine"]
Recipe = Literal["paper", "fast", "fast_stride8", "fast_stride8_local", "fast_stride8_mlp"]


@dataclasses.dataclass
class ADTRSettings:
    """What ADTR trains and scores with, beyond the backbone: the transformer, the maps and the optimiser.

    A field left at ``None`` takes the recipe's value, which is the paper's (:data:`PAPER_SETTINGS`) unless the
    recipe changes it; a value given here always wins over the recipe.

    Attributes:
        feature_stride: Stride of the common feature grid.
        patch_size: Grid positions per token along each side: ``feature_stride=8, patch_size=2`` gives a stride-8
            anomaly map for about the training cost of stride 16. 1 is the paper's one token per position.
        reconstructor: ``"transformer"`` (ADTR: attention and a learnable query), or one of the paper's Table 4
            ablations, for comparison: ``"no_query"`` (the decoder starts from the encoder output), ``"mlp"`` (the
            same layers without attention) or ``"cnn"`` (a plain convolutional autoencoder).
        hidden_dim: Transformer width.
        num_encoder_layers: Encoder depth.
        num_decoder_layers: Decoder depth.
        num_heads: Attention heads.
        ffn_dim: Feed-forward width.
        dropout: Dropout in attention and feed-forward layers.
        attention_dropout: What attention dropout drops in training: ``"weights"`` (paper: each attention weight on
            its own) or ``"keys"``: whole keys per image and head, masked before the softmax (DropKey), which lets
            PyTorch's fused attention kernel run. Inference is the same in both.
        neighbor_mask: UniAD's neighbourhood mask: no token attends to the ``neighbor_mask x neighbor_mask`` block of
            token positions around its own (odd; UniAD: 7). 0 is off (paper).
        attention_locality: Subtract this times the squared distance between two tokens' grid positions from their
            attention logit, so attention starts out local (a 2-D ALiBi). 0 is off (paper).
        pooling_kernel: Average-pooling window (pixels) for the image score.
        map_layers: Stages whose reconstruction error forms the pixel anomaly map (the paper: all of ``layers``;
            list them to get that under a recipe that drops one); the image score keeps the map of all stages.
        feature_jitter: UniAD's feature jitter: training-time Gaussian noise on the input features, per token
            ``feature_jitter * ||f|| / C`` (UniAD: 20). 0 is off (paper).
        normalize_features: Standardise each feature channel with its training mean and standard deviation (one
            pass over the training images when training starts). Off in the paper.
        normalize_map: Standardise the anomaly map and the image score's map at every pixel with the mean and
            standard deviation of the trained model's maps of the normal training images: a per-position prior, as
            PaDiM's, for aligned parts. Off in the paper.
        loss_reduction: ``"sum"`` over channels (paper) or ``"mean"`` (UniAD's MSE).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``"step"`` (paper: x0.1 after 80% of the steps) or ``"cosine"`` (smoother for short runs).
        warmup_steps: Linear learning-rate warmup over this many optimiser steps, at most half of the run (0: none,
            as in the paper).
        gradient_clip_val: Clip the gradient norm to this value (UniAD: 0.1); 0 does not clip (paper).
        bf16: Run the transformer's training forward/backward under bfloat16 autocast (fp32 weights and loss;
            inference stays fp32) where the hardware computes bf16 natively (CPUs with AVX-512 BF16 or AMX, recent
            GPUs). Elsewhere training stays in float32, since emulated bf16 is slower.
    """

    feature_stride: int | None = None
    patch_size: int | None = None
    reconstructor: ReconstructorKind | None = None
    hidden_dim: int | None = None
    num_encoder_layers: int | None = None
    num_decoder_layers: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None
    dropout: float | None = None
    attention_dropout: AttentionDropout | None = None
    neighbor_mask: int | None = None
    attention_locality: float | None = None
    pooling_kernel: int | None = None
    map_layers: list[str] | None = None
    feature_jitter: float | None = None
    normalize_features: bool | None = None
    normalize_map: bool | None = None
    loss_reduction: LossReduction | None = None
    lr: float | None = None
    weight_decay: float | None = None
    lr_schedule: LRSchedule | None = None
    warmup_steps: int | None = None
    gradient_clip_val: float | None = None
    bf16: bool | None = None


SETTING_NAMES = tuple(field.name for field in dataclasses.fields(ADTRSettings))
# The paper's settings (recipe "paper"); ``gradient_clip_val`` 0 is no clipping, ``map_layers`` None every stage.
PAPER_SETTINGS: dict[str, Any] = {
    "feature_stride": 16,
    "patch_size": 1,
    "reconstructor": "transformer",
    "hidden_dim": 256,
    "num_encoder_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 8,
    "ffn_dim": 1024,
    "dropout": 0.1,
    "attention_dropout": "weights",
    "neighbor_mask": 0,
    "attention_locality": 0.0,
    "pooling_kernel": 16,
    "map_layers": None,
    "feature_jitter": 0.0,
    "normalize_features": False,
    "normalize_map": False,
    "loss_reduction": "sum",
    "lr": 1e-4,
    "weight_decay": 1e-4,
    "lr_schedule": "step",
    "warmup_steps": 0,
    "gradient_clip_val": 0.0,
    "bf16": True,
}

# Named training recipes: the settings each one changes from the paper's, chosen by learning curves on several data
# sets and seeds (benchmarks/convergence.py; the studies are in benchmarks/README.md).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "dropout": 0.0,
        "feature_jitter": 20.0,
        "normalize_features": True,
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "gradient_clip_val": 0.1,
        # The pixel map without the stride-32 stage (still reconstructed, and still in the image score).
        "map_layers": list(DEFAULT_LAYERS[:-1]),
        # Both maps standardised per pixel by the trained model's maps of the normal training images.
        "normalize_map": True,
    },
}
# "fast" on a stride-8 anomaly map at stride-16 attention cost: 16x16 tokens, each reconstructing a 2x2 block of
# stride-8 positions: finer outlines of small defects (pixel AUPRO) for a little image AUROC.
RECIPES["fast_stride8"] = {**RECIPES["fast"], "feature_stride": 8, "patch_size": 2}
# "fast_stride8" without attention (the paper's Table 4 "w/o attention"): the same layers' feed-forward blocks rebuild
# each token on its own. On BSData and the built-in textures as good or better in about half the training time; not
# the recommended recipe, since ADTR is the attention model and the paper found attention better on MVTec-AD objects
# (benchmarks/README.md, "The fast recipe").
RECIPES["fast_stride8_mlp"] = {**RECIPES["fast_stride8"], "reconstructor": "mlp"}
# "fast_stride8" with attention biased towards nearby tokens (``attention_locality=1``: a logit penalty of 1 per squared
# token step). Plain "fast_stride8" learns little in 6 epochs beyond the training features' mean at each position
# (convergence.py's "mean" control scores as well on the textures); local attention rebuilds each token from its
# surroundings and itself, as the MLP does, while the decoder still starts from the learnable query.
RECIPES["fast_stride8_local"] = {**RECIPES["fast_stride8"], "attention_locality": 1.0}


# What the configs, the demo and the benchmark train by default: the recipe and its length in optimiser steps.
DEFAULT_RECIPE: Recipe = "fast"
DEFAULT_STEPS = 500


def resolve_settings(
    recipe: str,
    layers: Sequence[str],
    settings: ADTRSettings | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ADTRSettings:
    """The settings ADTR trains with: the paper's, then the ``recipe``'s, then what the user set.

    What the user set: every field of ``settings`` (an :class:`ADTRSettings`, or a dict such as a checkpoint's
    saved settings) and of ``overrides`` (settings given to the constructor by name) that is not ``None``. The
    recipe's ``map_layers`` are stages of the default ``layers``, so other layers keep their full map.

    Raises:
        ValueError: For an unknown recipe, an unknown setting, one set twice to different values, or an optimiser
            setting that would fail deep inside torch; the message names it.
    """
    if recipe not in RECIPES:
        msg = f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}."
        raise ValueError(msg)
    if settings is None:
        chosen: dict[str, Any] = {}
    elif isinstance(settings, ADTRSettings):
        chosen = dataclasses.asdict(settings)
    elif isinstance(settings, Mapping):
        chosen = dict(settings)
    else:
        msg = f"settings must be an ADTRSettings, a dict of its fields or None, got {type(settings).__name__}."
        raise ValueError(msg)
    overrides = dict(overrides or {})
    unknown = sorted((set(chosen) | set(overrides)) - set(SETTING_NAMES))
    if unknown:
        msg = f"unknown ADTR settings {unknown}; the settings are {list(SETTING_NAMES)}."
        raise ValueError(msg)
    chosen = {key: value for key, value in chosen.items() if value is not None}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    twice = sorted(key for key in set(chosen) & set(overrides) if chosen[key] != overrides[key])
    if twice:
        msg = f"{twice} given both by name and in `settings`, with different values; give each once."
        raise ValueError(msg)
    from_recipe = {
        key: value
        for key, value in RECIPES[recipe].items()
        if not (key == "map_layers" and list(layers) != list(DEFAULT_LAYERS))
    }
    effective = {**PAPER_SETTINGS, **from_recipe, **chosen, **overrides}
    if effective["map_layers"] is not None:
        effective["map_layers"] = list(effective["map_layers"])
    check_optimizer_settings(effective)
    return ADTRSettings(**effective)


def check_optimizer_settings(settings: Mapping[str, Any]) -> None:
    """Refuse optimiser and schedule settings that would fail deep inside torch or train nothing.

    Raises:
        ValueError: Naming the setting and the values it accepts.
    """
    lr_schedule = settings["lr_schedule"]
    if lr_schedule not in {"step", "cosine"}:
        msg = f"lr_schedule must be 'step' or 'cosine', got {lr_schedule!r}."
        raise ValueError(msg)
    lr, weight_decay = settings["lr"], settings["weight_decay"]
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(weight_decay) and weight_decay >= 0):
        msg = f"lr must be a finite number > 0 and weight_decay one >= 0, got lr={lr}, weight_decay={weight_decay}."
        raise ValueError(msg)
    warmup_steps = settings["warmup_steps"]
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        msg = f"warmup_steps must be a whole number >= 0, got {warmup_steps!r}."
        raise ValueError(msg)
    clip = settings["gradient_clip_val"]
    if not (math.isfinite(clip) and clip >= 0):
        msg = f"gradient_clip_val must be 0 (no clipping) or a finite number > 0, got {clip!r}."
        raise ValueError(msg)
