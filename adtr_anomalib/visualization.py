"""ADTR's default visualiser: anomalib's image visualiser that also hands its images to the run's loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from anomalib.loggers.base import ImageLoggerBase
from anomalib.visualization import ImageVisualizer
from lightning.pytorch import LightningModule, Trainer

__all__ = ["LoggingImageVisualizer"]


class LoggingImageVisualizer(ImageVisualizer):
    """:class:`~anomalib.visualization.ImageVisualizer` that also logs each picture to the image loggers.

    anomalib 2.7's visualiser only writes files; its TensorBoard, MLflow, W&B and Comet loggers
    (``ImageLoggerBase``) still offer ``add_image``, which anomalib 1.x's visualisation callback fed. This feeds it
    again, with the same names (``<folder>_<file>``), so a run tracked with ``--logger`` shows its test and predict
    images. Without such a logger it is exactly the parent.
    """

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write the images as the parent does, then send them to every image logger of the trainer."""
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, ImageLoggerBase)]
        if not loggers:
            return
        for item in batch:
            image = self.visualize(item)
            if image is None:
                continue
            path = Path(item.image_path or f"image_{batch_idx}.png")
            for logger in loggers:
                logger.add_image(
                    np.asarray(image), name=f"{path.parent.name}_{path.name}", global_step=pl_module.global_step
                )
