"""What ADTR and ADTR+ share as anomalib modules: the network, weights, pre-processing, optimiser and hooks.

The pieces with their own concern live in ``components/``, each in one named file: ``checkpoints.py`` (checkpoint
compatibility and RNG state), ``feature_cache.py`` (the frozen-feature cache), ``training.py`` (recipes, step
budgets, learning-rate schedule, bf16), ``export.py`` (INT8 settings and frozen torch export), ``backbone.py`` (timm
stages and ImageNet weights without a model hub).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from adtr_anomalib.data.validation import check_datamodule_files, check_dataset_files, check_folder_layout
from adtr_anomalib.visualization import LoggingImageVisualizer

from .components import FEATURE_STATISTICS, MAP_STATISTICS, SumReduce
from .components.backbone import backbone_normalization
from .components.checkpoints import (
    CHECKPOINT_IO,
    RNG_STATE_KEY,
    check_checkpoint_file,
    check_saved_by,
    fill_statistics,
    match_evaluator_state,
    network_arguments_to_adopt,
    read_network_state,
    rng_state,
    saved_arguments,
    set_rng_state,
)
from .components.export import frozen_parameters, quantize_ov
from .components.feature_cache import FeatureCache, cache_blockers
from .components.settings import SETTING_NAMES, ADTRSettings, resolve_settings
from .components.training import check_finite, lr_scheduler, native_bf16
from .torch_model import ADTRModel

logger = logging.getLogger(__name__)

# The arguments and settings of ADTR and ADTR+ that `ADTRModel` takes: all of its own but the weights source and the
# image size (set by the pre-processor).
MODEL_ARGUMENTS = tuple(
    name for name in inspect.signature(ADTRModel).parameters if name not in {"pre_trained", "weights", "input_size"}
)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named constructor arguments of ``cls``, following ``**kwargs`` passed on to a parent's constructor.

    ``ADTRPlus`` takes its own arguments and passes the rest to ``ADTR``; ``inspect.signature`` shows only the
    former. (jsonargparse resolves the same for the CLI, but has no public function for it.)
    """
    parameters: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        own = inspect.signature(klass.__init__).parameters.values()
        named = (p for p in own if p.name != "self" and p.kind not in {p.VAR_POSITIONAL, p.VAR_KEYWORD})
        parameters.update({p.name: p for p in named if p.name not in parameters})
        if not any(p.kind is p.VAR_KEYWORD for p in own):
            break
    return parameters


class ADTRLightningMixin:
    """ADTR's hooks around the network: weights, pre-processing, checks, checkpoints, statistics, optimiser.

    Kept apart from ``ADTR`` (which holds the constructor and the training step, and which ``ADTRPlus``
    subclasses) so that each model file holds what differs between the models.
    """

    model: ADTRModel
    settings: ADTRSettings
    hparams: Any

    def build_adtr(
        self,
        recipe: str,
        settings: ADTRSettings | Mapping[str, Any] | None,
        setting_values: Mapping[str, Any],
    ) -> None:
        """Resolve the settings (paper, recipe, then the user's) and build the torch model from them and the saved
        backbone arguments; the backbone weights come later, when training starts.

        The hyper-parameters keep the constructor's shape with the effective settings in ``settings``, so a
        checkpoint rebuilds the trained network whatever the recipe's values become in later versions.
        """
        # ADTR+'s hyper-parameters land here when its checkpoint is loaded as ADTR.
        check_saved_by({"hyper_parameters": setting_values}, type(self).__name__, owner_is_plus=False, path=None)
        self.settings = resolve_settings(recipe, self.hparams.layers, settings, setting_values)
        for name in setting_values:
            self.hparams.pop(name, None)
        self.hparams["settings"] = dataclasses.asdict(self.settings)
        self.model = self._network(self.input_size or (256, 256))
        self.feature_cache = FeatureCache()
        self._map_statistics_step: int | None = None  # global step the map statistics were fitted at

    def _network(self, input_size: tuple[int, int]) -> ADTRModel:
        """The torch model for ``input_size`` from the hyper-parameters, without backbone weights."""
        arguments = saved_arguments(self.hparams)
        return ADTRModel(pre_trained=False, input_size=input_size, **{k: arguments[k] for k in MODEL_ARGUMENTS})

    def _adopt_arguments(self, changed: Mapping[str, Any]) -> None:
        """Take network arguments from a checkpoint: backbone and layers as arguments, the rest as settings."""
        for name in ("backbone", "layers"):
            if name in changed:
                self.hparams[name] = changed[name]
        rest = {key: value for key, value in changed.items() if key in SETTING_NAMES}
        self.settings = dataclasses.replace(self.settings, **rest)
        self.hparams["settings"] = dataclasses.asdict(self.settings)

    @classmethod
    def default_pre_processor(cls, pre_processor: nn.Module | bool, backbone: str) -> nn.Module | bool:
        """``True`` means resize plus the backbone's normalisation (the base class would use ImageNet's)."""
        return cls.configure_pre_processor(backbone=backbone) if pre_processor is True else pre_processor

    @classmethod
    def configure_visualizer(cls) -> LoggingImageVisualizer:
        """anomalib's visualiser, also feeding the images to TensorBoard/MLflow/W&B/Comet loggers when given."""
        return LoggingImageVisualizer()

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "efficientnet_b4",
    ) -> PreProcessor:
        """Resize (default 256x256, the paper's size) and normalise with the backbone's own statistics."""
        mean, std = backbone_normalization(backbone)
        return PreProcessor(transform=Compose([Resize(image_size or (256, 256), antialias=True), Normalize(mean, std)]))

    def prepare_data(self) -> None:
        """Check a ``Folder`` datamodule's folders (masks pair with images) before anomalib reads them."""
        check_folder_layout(getattr(getattr(self, "_trainer", None), "datamodule", None))

    def setup(self, stage: str) -> None:
        """Check every image and mask file before anything slow (downloads, checkpoints), so a corrupt image stops
        the run at once, with its name."""
        del stage
        check_datamodule_files(getattr(getattr(self, "_trainer", None), "datamodule", None))

    def on_fit_start(self) -> None:
        """Load the weights training starts from. Lightning has restored a resumed checkpoint by now (it has not
        yet in ``setup``), so a resumed run keeps the checkpoint's weights and never downloads."""
        self.load_weights()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs) -> Any:
        """Lightning's loader, refusing a file that is no checkpoint with its name (``anomalib export`` uses it)."""
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def on_test_start(self) -> None:
        """Refuse to score with random weights (see :meth:`check_trained`)."""
        self.check_trained()

    def on_predict_start(self) -> None:
        """Refuse to score with random weights (see :meth:`check_trained`)."""
        self.check_trained()

    def check_trained(self) -> None:
        """Refuse to test or predict with a model that was never trained nor loaded from a checkpoint.

        ImageNet weights are only loaded when training starts, so such a model has a random backbone and a random
        transformer: its scores would look plausible and mean nothing. A checkpoint (``ckpt_path`` is restored
        before this runs) or a fit sets ``backbone_weights_loaded``. ``pre_trained=False`` asks for random
        weights, so it only gets a warning.
        """
        if bool(self.model.backbone_weights_loaded):
            return
        msg = (
            f"{type(self).__name__} has not been trained and no checkpoint was given, so its backbone and "
            "transformer are random. Fit it first (engine.fit / anomalib train), pass ckpt_path=... (--ckpt_path) "
            f"with a trained checkpoint, or load one with {type(self).__name__}.load_from_checkpoint(path)."
        )
        if self.hparams.pre_trained:
            raise RuntimeError(msg)
        logger.warning(msg)

    def load_weights(self) -> None:
        """ImageNet backbone weights before training, unless a checkpoint (resumed, or trained before) has them.

        Only when fitting: to test or predict, the weights come from the checkpoint or the training that just ran,
        and ``anomalib predict --model ADTR --ckpt_path ...`` must not download the default backbone's weights.
        """
        if self.hparams.pre_trained and not bool(self.model.backbone_weights_loaded):
            self.model.load_backbone_weights(self.hparams.weights)

    def load_network_weights(self, path: str | Path, argument: str = "checkpoint") -> None:
        """Copy the ``ADTRModel`` weights (backbone, transformer, statistics) of a trained ADTR or ADTR+ file.

        The start of ADTR+ (``adtr_checkpoint``), or of an ADTR trained further with a fresh optimiser and schedule
        (the benchmark's ``start_from``); a resumed run uses Lightning's ``ckpt_path`` instead.

        Args:
            path: A Lightning ``.ckpt`` of ADTR or ADTR+, or a saved ``ADTRModel`` state dict.
            argument: The argument that named the file, for the error messages.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is no checkpoint of this network; the message names the differences.
        """
        owner = type(self).__name__
        safe = self.checkpoint_safe_globals()  # type: ignore[attr-defined]
        self.model.load_state_dict(
            read_network_state(path, self.model, saved_arguments(self.hparams), argument, owner, safe)
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also save the random number generators, so a run resumed from this checkpoint continues exactly."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[RNG_STATE_KEY] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the saved pre-processor, then rebuild the network if its image size differs.

        ``load_from_checkpoint`` builds the model before the saved pre-processor is restored (it is not a
        hyper-parameter), i.e. for 256x256; a model trained at another size would then not load, because its
        query and positional embeddings have one entry per feature-grid position.

        A resumed ``fit`` also continues the saved random sequence (the same shuffles and dropout as without the
        break). It must happen here: Lightning builds the first epoch's data iterator, drawing its shuffle, in
        ``configure_optimizers`` (``estimated_stepping_batches``), before any later hook. A plain load, or a test
        from a checkpoint, leaves the caller's generators alone.
        """
        path = getattr(getattr(self, "_trainer", None), "ckpt_path", None)
        is_plus = "adtr_checkpoint" in constructor_parameters(type(self))
        check_saved_by(checkpoint, type(self).__name__, is_plus, path)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        size = self.input_size
        size = (int(size[0]), int(size[1])) if size is not None else self.model.input_size
        changed = network_arguments_to_adopt(checkpoint, self.hparams, MODEL_ARGUMENTS, type(self).__name__)
        self._adopt_arguments(changed)
        if changed or size != self.model.input_size:
            self.model = self._network(size)
        match_evaluator_state(checkpoint, self)
        fill_statistics(checkpoint, self.model, (*FEATURE_STATISTICS, *MAP_STATISTICS))
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and RNG_STATE_KEY in checkpoint:
            set_rng_state(checkpoint[RNG_STATE_KEY])

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:
        """anomalib's INT8 post-training quantisation, with the NNCF settings of :func:`quantize_ov`."""
        return quantize_ov(model, datamodule)

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """anomalib's torch export, saved with every parameter frozen (see :func:`frozen_parameters`)."""
        with frozen_parameters(self):  # type: ignore[arg-type]
            return super().to_torch(export_root, model_file_name)  # type: ignore[misc]

    def training_dataset(self) -> Any:
        """The training dataset, from the datamodule or, when fitting with plain dataloaders, from the loader."""
        trainer = getattr(self, "_trainer", None)
        dataset = getattr(getattr(trainer, "datamodule", None), "train_data", None)
        if dataset is None:
            dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        return dataset

    def on_train_start(self) -> None:
        """Decide whether backbone features can be cached.

        Files of training data given as plain dataloaders (no datamodule, so ``setup`` saw none) are checked here.
        """
        check_dataset_files([self.training_dataset()])
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        blockers = cache_blockers(datamodule, self.training_dataset())
        self.feature_cache.enable(bool(self.hparams.cache_features) and not blockers)
        if self.hparams.cache_features and blockers:
            logger.info("%s: feature cache off because %s.", type(self).__name__, " and ".join(blockers))
        if self.model.needs_feature_statistics:
            self.fit_feature_statistics()

    def fit_feature_statistics(self) -> None:
        """Per-channel feature statistics from one pass over the training images (``normalize_features``).

        The datamodule's own training dataloader is read and pre-processed as the training steps are, so the
        statistics see exactly the images training sees. The pass fills the feature cache, whose features are then
        standardised in place: the first epoch does not run the backbone again.
        """
        started = time.perf_counter()
        features = (
            self.feature_cache.get(images, paths, self.model.backbone_features)
            for images, paths in self._training_images()
        )
        self.model.fit_feature_statistics(features, reduce=self.sum_over_processes())
        self.feature_cache.transform(self.model.standardize)
        logger.info("%s: feature statistics fitted in %.1f s.", type(self).__name__, time.perf_counter() - started)

    def sum_over_processes(self) -> SumReduce | None:
        """In distributed training each process reads its own shard of the training set: sum the statistics'
        accumulators over all of them, so every process (and the checkpoint) gets those of the whole set."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return None

        def reduce(value: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(value.to(self.device), reduce_op="sum").to(value.device)

        return reduce

    def on_validation_start(self) -> None:
        """Fit the map statistics (``normalize_map``) to the weights that validation will see."""
        self.refresh_map_statistics()

    def on_train_epoch_end(self) -> None:
        """After the last epoch, fit the map statistics before the checkpoint of a run without validation is saved."""
        trainer = self.trainer
        epochs = trainer.max_epochs
        last = epochs is not None and epochs >= 0 and self.current_epoch + 1 >= epochs
        if last or trainer.should_stop:
            self.refresh_map_statistics()

    def on_train_end(self) -> None:
        """Fit the map statistics to the final weights if a step limit ended training early; free the cache."""
        self.refresh_map_statistics()
        self.feature_cache.clear()

    def refresh_map_statistics(self) -> None:
        """While fitting with ``normalize_map``: per-pixel map statistics of the normal training images, once
        for every state of the weights (validation after the last epoch and the end of training share one pass).

        The training dataloader is read and pre-processed as in training; images labelled anomalous (ADTR+'s
        real or synthetic anomalies) are left out, since the statistics describe normal maps.
        """
        trainer = getattr(self, "_trainer", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        if not (self.model.normalize_map and fitting) or self._map_statistics_step == self.global_step:
            return
        normal = (
            self.feature_cache.get(images, paths, self.model.extract_features)
            for images, paths in self._training_images(normal_only=True)
        )
        started = time.perf_counter()
        self.model.fit_map_statistics(normal, reduce=self.sum_over_processes())
        self._map_statistics_step = self.global_step
        logger.info("%s: anomaly-map statistics fitted in %.1f s.", type(self).__name__, time.perf_counter() - started)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights: a finite loss can still have one."""
        del optimizer
        gradients = [p.grad for p in self.model.reconstructor.parameters() if p.grad is not None]
        if gradients:
            check_finite(gradients, self.global_step, "a gradient of the transformer")

    def _training_images(self, normal_only: bool = False) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        """Pre-processed batches of the training dataloader with their image paths (the feature cache's keys).

        Args:
            normal_only: Leave out images labelled anomalous (ADTR+'s real or synthetic anomalies).
        """
        pre_processor = self.pre_processor if isinstance(self.pre_processor, nn.Module) else nn.Identity()
        for batch in self.trainer.train_dataloader:
            images, paths = batch.image, getattr(batch, "image_path", None)
            if normal_only and getattr(batch, "gt_label", None) is not None:
                keep = ~batch.gt_label.to(dtype=torch.bool).view(-1).cpu()
                images = images[keep.to(images.device)]
                if paths is not None:
                    paths = [path for path, kept in zip(paths, keep.tolist(), strict=True) if kept]
            if len(images):
                yield pre_processor(images.to(self.device)), paths

    def training_features(self, batch: Batch) -> torch.Tensor:
        """Backbone features for a training batch, from the cache when every image of it is there."""
        return self.feature_cache.get(batch.image, getattr(batch, "image_path", None), self.model.extract_features)

    def reconstruct_for_training(self, features: torch.Tensor) -> torch.Tensor:
        """Transformer reconstruction under bf16 autocast when enabled; returned in fp32 for the loss."""
        # Autocast here rather than Lightning's precision="bf16-mixed": that is a Trainer setting over the whole step
        # (frozen backbone and validation maps too), so a model argument could not turn it on only for the
        # transformer, and only where the hardware computes bf16 natively.
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._bf16_enabled()):
            reconstruction = self.model.reconstruct(features)
        return reconstruction.float()

    def _bf16_enabled(self) -> bool:
        return bool(self.settings.bf16) and native_bf16(self.device)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores for the validation images (used for normalisation and thresholds)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the transformer only (the backbone stays frozen), stepped per iteration."""
        optimizer = torch.optim.AdamW(
            self.model.reconstructor.parameters(),
            lr=self.settings.lr,
            weight_decay=self.settings.weight_decay,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = lr_scheduler(optimizer, self.settings.lr_schedule, total, int(self.settings.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (scores of an untrained model carry no information); the model's gradient clip;
        checkpoint files checked before they are read."""
        return {
            "num_sanity_val_steps": 0,
            "gradient_clip_val": self.settings.gradient_clip_val or None,  # 0: no clipping
            "plugins": [CHECKPOINT_IO],
        }

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's default: min-max normalisation and F1-adaptive thresholds from the validation set."""
        return PostProcessor()
