"""ADTR+: ADTR trained with the anomalies you already have (You et al., ICONIP 2022, Sec. 3.4).

Paper: https://arxiv.org/abs/2209.01816

The network, pre-processing, optimiser, inference and export are ADTR's (the same ``ADTRModel``); only the
training loss differs: normal regions are pulled toward a good reconstruction, labelled anomalous regions
(pixel masks, ``L_px``) or images (image labels, ``L_img``) are pushed away.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from adtr_anomalib import ADTRPlus
    >>> from adtr_anomalib.data import ConfettiNoise, WithAnomalies
    >>> datamodule = WithAnomalies(MVTecAD(category="bottle"), synthetic_anomalies=ConfettiNoise())
    >>> model = ADTRPlus(adtr_checkpoint="results/ADTR/MVTecAD/bottle/latest/weights/lightning/model.ckpt")
    >>> Engine(max_epochs=300).train(model=model, datamodule=datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from anomalib import TaskType
from anomalib.data import Batch
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT

from adtr_anomalib.models.adtr import ADTR
from adtr_anomalib.models.adtr.components.training import check_finite

from .loss import ADTRPlusLoss, masks_to_token_labels, pseudo_huber_error

logger = logging.getLogger(__name__)

__all__ = ["ADTRPlus"]

Supervision = Literal["auto", "pixel", "image"]


class ADTRPlus(ADTR, AnomalibModule):
    """ADTR+: ADTR's feature-reconstruction transformer, trained to fail on labelled anomalies.

    Training data: normal images plus anomalies with pixel masks (``L_px``) or image labels only
    (``L_img``), real or synthetic; see :mod:`adtr_anomalib.data` (``FolderWithAnomalies``,
    ``WithAnomalies``, ``ConfettiNoise``). As in the paper, start from a trained normal-only ADTR model
    (``adtr_checkpoint``) and train some more epochs. The learning type is ONE_CLASS (anomalib's post-
    processor and ``Engine.fit`` only train and normalise ONE_CLASS models), and the model at test time is
    exactly ADTR's.

    A subclass of :class:`~adtr_anomalib.ADTR` that also names ``AnomalibModule`` as a direct base: anomalib's
    ``get_model``/``list_models`` only find direct subclasses of ``AnomalibModule``.

    Args:
        adtr_checkpoint: A trained ADTR checkpoint (Lightning ``.ckpt`` or a saved ``ADTRModel`` state dict)
            to start from. Loaded when training starts (not when a trained ADTR+ model is restored), without
            executing code from the file (``weights_only``).
        supervision: ``"pixel"`` (``L_px``, needs masks), ``"image"`` (``L_img``, labels only; masks are
            ignored) or ``"auto"`` (``L_px`` when the training batches have masks, else ``L_img``).
        alpha: Weight of the anomaly term in both losses. Paper: 0.003.
        k: Top-k errors averaged into the image score of ``L_img``. Paper (CIFAR-10): 20.
        mask_threshold: How masks become token labels on the feature grid: ``None`` (default) marks a token
            anomalous if any pixel of its cell is; a float in ``(0, 1]`` needs at least that fraction.
        **kwargs: Every argument of :class:`~adtr_anomalib.ADTR` (the CLI lists them as ``--model.<name>``) and
            its settings, except ``loss_reduction``. The network's arguments must match the ADTR checkpoint when one
            is given (``normalize_map`` may differ: the map statistics are fitted again after ADTR+ training, on its
            normal training images); use the ADTR model's ``recipe``. The feature cache is turned off by itself
            for on-the-fly synthetic anomalies and augmentations.
    """

    def __init__(
        self,
        *,
        adtr_checkpoint: str | None = None,
        supervision: Supervision = "auto",
        alpha: float = 0.003,
        k: int = 20,
        mask_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        if supervision not in {"auto", "pixel", "image"}:
            msg = f"supervision must be 'auto', 'pixel' or 'image', got {supervision!r}."
            raise ValueError(msg)
        if mask_threshold is not None and not 0.0 < mask_threshold <= 1.0:
            msg = f"mask_threshold must be None (any anomalous pixel) or in (0, 1], got {mask_threshold}."
            raise ValueError(msg)
        super().__init__(**kwargs)
        if self.settings.loss_reduction != "sum":
            msg = (
                f"loss_reduction={self.settings.loss_reduction!r} is ADTR's L_norm setting; ADTR+ trains on its own "
                "losses (L_px, L_img). Leave it out."
            )
            raise ValueError(msg)
        self.adtr_checkpoint = adtr_checkpoint
        self.supervision = supervision
        self.mask_threshold = mask_threshold
        self.loss = ADTRPlusLoss(alpha=alpha, k=k)
        # Saved with the model: a trained ADTR+ model restored from its own checkpoint must not be reset to
        # the ADTR starting point when it is trained further.
        self.register_buffer("adtr_checkpoint_loaded", torch.tensor(False))

    def load_weights(self) -> None:
        """Load the ADTR starting point (once, before training; a resumed ADTR+ checkpoint has it), then ADTR's
        backbone weights if still needed."""
        if self.adtr_checkpoint and not bool(self.adtr_checkpoint_loaded):
            self.load_adtr_checkpoint(self.adtr_checkpoint)
        super().load_weights()

    def load_adtr_checkpoint(self, path: str | Path) -> None:
        """Start from the ``ADTRModel`` weights of a trained ADTR (see :meth:`ADTR.load_network_weights`)."""
        self.load_network_weights(path, argument="adtr_checkpoint")
        self.adtr_checkpoint_loaded.fill_(True)
        logger.info("ADTRPlus: started from the ADTR checkpoint '%s'.", path)

    def on_train_start(self) -> None:
        """Check that the training data fit the supervision before the first step; decide the feature cache."""
        super().on_train_start()
        dataset = self.training_dataset()
        if dataset is None:
            return
        has_masks = getattr(dataset, "task", None) == TaskType.SEGMENTATION
        if self.supervision == "pixel" and not has_masks:
            msg = (
                "supervision='pixel' needs pixel masks, but the training data have none (classification task). "
                "Give masks (FolderWithAnomalies train_mask_dir, a test split with masks) or use "
                "supervision='image' / 'auto'."
            )
            raise ValueError(msg)
        samples = getattr(dataset, "samples", None)
        has_anomalies = samples is not None and bool((samples["label_index"] == 1).any())
        if not has_anomalies and not getattr(dataset, "varies_between_epochs", False):
            logger.warning(
                "ADTRPlus: the training data hold no anomalies, so it trains on normal images only. Add some with "
                "adtr_anomalib.data.FolderWithAnomalies or WithAnomalies (move_from_test, synthetic_anomalies)."
            )

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step on ``L_px`` (masks) or ``L_img`` (labels)."""
        del args, kwargs
        features = self.training_features(batch)
        error = pseudo_huber_error(features, self.reconstruct_for_training(features))
        labels = batch.gt_label.float() if batch.gt_label is not None else torch.zeros(len(error), device=error.device)
        token_labels = None
        if self.supervision != "image" and batch.gt_mask is not None:
            token_labels = masks_to_token_labels(batch.gt_mask, error.shape[-2:], self.mask_threshold)
            labels = torch.maximum(labels, token_labels.flatten(1).amax(dim=1))
        elif self.supervision == "pixel":
            msg = "supervision='pixel' but this training batch has no masks (gt_mask is None)."
            raise ValueError(msg)
        loss = self.loss(error, labels, token_labels)
        check_finite(loss, self.global_step)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(error))
        return {"loss": loss}
