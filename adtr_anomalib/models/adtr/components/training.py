"""Training helpers shared by ADTR and ADTR+: step budgets, the learning-rate schedule, bf16, divergence checks."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .settings import LRSchedule


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
