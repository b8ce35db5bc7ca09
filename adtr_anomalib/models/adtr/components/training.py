"""Training recipes and step helpers shared by ADTR and ADTR+: named recipes, the learning-rate schedule, bf16."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .backbone import DEFAULT_LAYERS

LRSchedule = Literal["step", "cosine"]
Recipe = Literal["paper", "fast", "fast_stride8", "fast_stride8_local", "fast_stride8_mlp"]
# Named training recipes: the arguments each one changes from the paper's defaults, chosen by learning curves on
# several data sets and seeds (benchmarks/convergence.py; the studies are in benchmarks/README.md).
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


def step_budget(steps: int) -> dict[str, Any]:
    """Lightning ``Trainer`` arguments that train for ``steps`` optimiser steps and validate once, at the end.

    A budget in steps gives a small data set as much training as a large one (counted in epochs, 200 images get a
    third of the steps of 600). Validation only fits the post-processor's normalisation and thresholds, so one pass
    after the last step is enough; ``check_val_every_n_epoch=None`` lets ``val_check_interval`` count steps across
    epochs.

    Args:
        steps: Optimiser steps of the whole run.

    Returns:
        ``max_steps``, ``max_epochs=-1`` (no epoch limit), ``val_check_interval`` and ``check_val_every_n_epoch``.

    Raises:
        ValueError: If ``steps`` is not a whole number >= 1.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        msg = f"the training budget must be a whole number of optimiser steps >= 1, got {steps!r}."
        raise ValueError(msg)
    return {"max_steps": steps, "max_epochs": -1, "val_check_interval": steps, "check_val_every_n_epoch": None}


def apply_recipe(arguments: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """ADTR's constructor ``arguments`` with the values of their ``recipe`` where they were left at their ``defaults``.

    An argument set to anything other than its default wins over the recipe. The recipe's ``map_layers`` are stages
    of the default ``layers``, so other layers keep their full map.

    Args:
        arguments: The constructor's arguments, ``recipe`` among them.
        defaults: The constructor's default values.

    Returns:
        The effective arguments.

    Raises:
        ValueError: If ``recipe`` is not one of :data:`RECIPES`.
    """
    recipe = arguments["recipe"]
    if recipe not in RECIPES:
        msg = f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}."
        raise ValueError(msg)
    settings = dict(arguments)
    for key, value in RECIPES[recipe].items():
        if key == "map_layers" and list(settings["layers"]) != list(DEFAULT_LAYERS):
            continue
        if settings[key] == defaults[key]:
            settings[key] = value
    return settings


def check_optimizer_arguments(settings: Mapping[str, Any]) -> None:
    """Refuse optimiser and schedule arguments that would fail deep inside torch or train nothing.

    Args:
        settings: ADTR's effective arguments (``lr``, ``weight_decay``, ``lr_schedule``, ``warmup_steps``,
            ``gradient_clip_val``).

    Raises:
        ValueError: Naming the argument and the values it accepts.
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
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        msg = f"gradient_clip_val must be None (no clipping) or a finite number > 0, got {clip!r}."
        raise ValueError(msg)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    total_steps: int,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: a linear warmup over ``warmup_steps``, then the schedule.

    The warmup is capped at half of ``total_steps``, so a short run on a small data set still decays.
    ``"step"``: x0.1 after 80% of the steps (the paper's epoch 400 of 500, whatever the length). ``"cosine"``:
    half a cosine from 1 down to 0.01 over the steps after the warmup.

    Args:
        optimizer: The optimiser whose learning rate is scaled.
        schedule: ``"step"`` or ``"cosine"``.
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Steps of linear warmup (at most half of ``total_steps``).

    Returns:
        A scheduler to step once per optimiser step.
    """
    warmup_steps = min(warmup_steps, total_steps // 2)
    milestone = math.ceil(0.8 * total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "step":
            return 0.1 if step >= milestone else 1.0
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    # One closed-form factor rather than SequentialLR(LinearLR, CosineAnnealingLR | MultiStepLR): the step milestone
    # is 80% of the whole run, warmup included, and the warmup is capped at half the run, which chained schedulers
    # express only through offsets that shift with the warmup; timm's schedulers would need Lightning's manual
    # lr_scheduler_step hook.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(values: torch.Tensor | Iterable[torch.Tensor], step: int, what: str = "the loss") -> None:
    """Stop a diverged run with advice instead of training a NaN model (one sync for all tensors).

    Lightning's ``detect_anomaly`` names the autograd node, not what the user can change, so this stays.

    Raises:
        FloatingPointError: If any value is NaN or infinite.
    """
    tensors = [values] if isinstance(values, torch.Tensor) else list(values)
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        msg = (
            f"ADTR training diverged at step {step}: {what} is NaN or infinite. Lower `lr`, use "
            "`loss_reduction='mean'`, or set `bf16=False`; check the images for NaN/inf values."
        )
        raise FloatingPointError(msg)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware.

    CPUs without AVX-512 BF16 or AMX emulate them: about 30x slower than float32 on AVX2-only ones, and 3.5x slower
    on an AVX-512 VNNI Xeon, where oneDNN still reports bf16 support; so on Linux the CPU's own flags decide first.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); ``None`` where that file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((line for line in text.splitlines() if line.startswith("flags")), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None
