"""PyTorch model for ADTR: frozen CNN features reconstructed by a query-based transformer.

Example:
    >>> import torch
    >>> from adtr_anomalib.models.adtr.torch_model import ADTRModel
    >>> model = ADTRModel(backbone="tf_efficientnet_lite0", pre_trained=False, input_size=(64, 64)).eval()
    >>> model(torch.rand(2, 3, 64, 64)).anomaly_map.shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .anomaly_map import AnomalyMapGenerator
from .components import (
    ATTENTION_DROPOUTS,
    DEFAULT_LAYERS,
    RECONSTRUCTORS,
    ADTRReconstructor,
    AttentionDropout,
    ReconstructorKind,
    SumReduce,
    moments,
    per_pixel_statistics,
)
from .components.backbone import backbone_stages, load_backbone_weights


class ADTRModel(nn.Module):
    """ADTR: embedding (frozen CNN) -> reconstruction (transformer) -> comparison (L2 distance).

    Args:
        backbone: timm CNN with ``features_only`` support. Paper: ``efficientnet_b4``.
        layers: Backbone stages to concatenate (timm ``feature_info`` module names). Paper: stages 1-5.
        pre_trained: Load ImageNet weights now (see :func:`load_backbone_weights` for the sources).
        weights: Optional local weights file for the backbone; implies ``pre_trained``.
        input_size: Image size after pre-processing. The query and positional embeddings have one entry
            per feature-grid position, so the size is fixed once the model is built.
        feature_stride: Stride of the common grid all stages are resized to. Paper: 16.
        patch_size: Grid positions per token along each side (see :class:`ADTRReconstructor`). Paper: 1.
        reconstructor: ``"transformer"`` (ADTR), or a Table 4 ablation: ``"no_query"``, ``"mlp"`` (no attention)
            or ``"cnn"`` (see :class:`ADTRReconstructor`).
        hidden_dim, num_encoder_layers, num_decoder_layers, num_heads, ffn_dim, dropout: Transformer
            sizes. Paper: 256, 4, 4, 8, 1024, 0.1.
        attention_dropout: What attention dropout drops in training: ``"weights"`` (paper) or ``"keys"``, whole keys
            per image and head, which lets PyTorch's fused attention run (see :class:`ADTRReconstructor`).
        neighbor_mask, attention_locality: Biases on every attention's logits from the token grid: UniAD's
            neighbourhood mask and a squared-distance penalty (see :class:`ADTRReconstructor`). Paper: 0, 0.
        pooling_kernel: Averaging window for the image score, in pixels. UniAD: 16.
        map_layers: Stages whose reconstruction error forms the pixel anomaly map; ``None`` is all of ``layers``
            (paper). The network still reconstructs every stage and the image score still comes from the map of
            all of them: a deep stage's context helps reconstruct and score whole images, but its coarse channels
            blur the map of small defects.
        feature_jitter: UniAD's training-time feature jitter scale (see :class:`ADTRReconstructor`). Paper: 0.
        normalize_features: Standardise every feature channel with its mean and standard deviation over the
            training images (set by :meth:`fit_feature_statistics`) before reconstruction. Without it the
            squared error is dominated by the few high-variance channels of the deepest stage. Paper: off.
        normalize_map: Standardise the anomaly map (and the map the image score is taken from) at every pixel
            with the mean and standard deviation of the trained model's maps of normal training images there
            (set by :meth:`fit_map_statistics`). On aligned parts the reconstruction error of normal images is
            high in some places (edges, reflections) and low in others; a per-position prior, as PaDiM's, stops
            those places from outscoring small defects elsewhere. Paper: off.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights: str | Path | None = None,
        input_size: tuple[int, int] = (256, 256),
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
    ) -> None:
        super().__init__()
        layers = list(layers)
        indices = _validate(
            backbone,
            layers,
            map_layers,
            input_size,
            feature_stride,
            patch_size,
            reconstructor,
            hidden_dim,
            num_heads,
            pooling_kernel,
            dropout,
            attention_dropout,
            feature_jitter,
            neighbor_mask,
            attention_locality,
        )
        self.layers = layers
        self.backbone = backbone
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.feature_grid = (self.input_size[0] // feature_stride, self.input_size[1] // feature_stride)
        self.feature_extractor = TimmFeatureExtractor(backbone=backbone, layers=indices, pre_trained=False)
        self.feature_extractor.requires_grad_(False)  # frozen: never in the optimiser, no gradients kept
        channels = sum(self.feature_extractor.out_dims)
        self.reconstructor = ADTRReconstructor(
            in_channels=channels,
            num_tokens=(self.feature_grid[0] // patch_size) * (self.feature_grid[1] // patch_size),
            hidden_dim=hidden_dim,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            feature_jitter=feature_jitter,
            patch_size=patch_size,
            kind=reconstructor,
            attention_dropout=attention_dropout,
            neighbor_mask=neighbor_mask,
            attention_locality=attention_locality,
        )
        self.normalize_features = normalize_features
        # Per-channel statistics of the training features. Always present (identity until fitted), so a
        # checkpoint carries them to ADTR+, predict and export whatever the constructor arguments say there.
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.register_buffer("feature_statistics_fitted", torch.tensor(False))
        self.anomaly_map_generator = AnomalyMapGenerator(pooling_kernel=pooling_kernel)
        self.normalize_map = normalize_map
        # Per-pixel statistics of the maps of normal training images: [0] the pixel map, [1] the map of all stages
        # that gives the image score. Identity until fitted; always present, as the feature statistics.
        self.register_buffer("map_mean", torch.zeros(2, *self.input_size))
        self.register_buffer("map_std", torch.ones(2, *self.input_size))
        self.register_buffer("map_statistics_fitted", torch.tensor(False))
        self.map_layers = list(map_layers) if map_layers is not None else list(layers)
        starts = [0, *itertools.accumulate(self.feature_extractor.out_dims)]
        # The map's channels as ``(start, stop)`` runs of the concatenated features, neighbouring stages merged.
        # Slices, not an index tensor: an exported graph gathers indexed channels with a transpose of the whole
        # feature map (a tenth of OpenVINO's time at batch 16); a slice is free. Derived from the arguments.
        self.map_slices: list[tuple[int, int]] = []
        for index, layer in enumerate(layers):
            if layer not in self.map_layers:
                continue
            if self.map_slices and self.map_slices[-1][1] == starts[index]:
                self.map_slices[-1] = (self.map_slices[-1][0], starts[index + 1])
            else:
                self.map_slices.append((starts[index], starts[index + 1]))
        self.map_is_all = self.map_slices == [(0, starts[-1])]
        # Persistent flag, so a model restored from a checkpoint never fetches backbone weights again.
        self.register_buffer("backbone_weights_loaded", torch.tensor(False))
        if pre_trained or weights is not None:
            self.load_backbone_weights(weights)

    @property
    def num_channels(self) -> int:
        """Channels ``C`` of the concatenated multi-scale feature map.

        Returns:
            The sum of the selected stages' channels.
        """
        return sum(self.feature_extractor.out_dims)

    def load_backbone_weights(self, weights: str | Path | None = None) -> str:
        """Load ImageNet weights into the frozen backbone; returns where they came from.

        Args:
            weights: Local weights file; ``None`` tries packaged offline weights, then timm's hub.

        Returns:
            A description of the source, for the log.
        """
        source = load_backbone_weights(self.feature_extractor.feature_extractor, self.backbone, weights)
        self.backbone_weights_loaded.fill_(True)
        return source

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen multi-scale features, standardised with the per-channel statistics (identity until fitted).

        Args:
            images: Pre-processed ``(B, 3, H, W)`` images at the model's ``input_size``.

        Returns:
            ``(B, C, h, w)`` features: :meth:`standardize` of :meth:`backbone_features`.
        """
        return self.standardize(self.backbone_features(images))

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's stages, each resized to the ``feature_stride`` grid and concatenated, not standardised.

        Bilinear with ``align_corners=True`` for every stage, down-sampling included, as UniAD does.

        Args:
            images: Pre-processed ``(B, 3, H, W)`` images at the model's ``input_size``.

        Returns:
            ``(B, C, h, w)`` features.

        Raises:
            ValueError: If the images are not the size the model was built for.
        """
        if tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"ADTR was built for {self.input_size[0]}x{self.input_size[1]} inputs but got "
                f"{images.shape[-2]}x{images.shape[-1]}. Resize images in the pre-processor to the model's size."
            )
            raise ValueError(msg)
        with torch.no_grad():
            stages = self.feature_extractor(images).values()
            # A stage already on the grid is not resized: an exported graph would still run the identity resize.
            resized = [
                f
                if f.shape[-2:] == self.feature_grid
                else F.interpolate(f, self.feature_grid, mode="bilinear", align_corners=True)
                for f in stages
            ]
            return torch.cat(resized, dim=1)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation with the fitted training statistics (``normalize_features``).

        Args:
            features: ``(B, C, h, w)`` or ``(C, h, w)`` features from :meth:`backbone_features`.

        Returns:
            The same shape, ``(features - mean) / std`` per channel.
        """
        return (features - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    @property
    def needs_feature_statistics(self) -> bool:
        """``normalize_features`` is on and the statistics have not been fitted (or restored) yet.

        Returns:
            ``True`` while :meth:`fit_feature_statistics` still has to run.
        """
        return self.normalize_features and not bool(self.feature_statistics_fitted)

    @torch.no_grad()
    def fit_feature_statistics(self, features: Iterable[torch.Tensor], reduce: SumReduce | None = None) -> None:
        """Set the per-channel mean and standard deviation from batches of training features.

        Accumulated in float64 over every position of every image, so the result does not depend on batching.
        ``reduce`` sums the accumulators over processes (distributed training, where each sees a shard).

        Args:
            features: Batches of :meth:`backbone_features` of the training images (not yet standardised).
            reduce: Sums a tensor over processes; ``None`` in a single process.

        Raises:
            ValueError: If ``features`` yields no images.
        """
        batches = (batch.to(self.feature_mean.device) for batch in features)
        count, mean, std = moments(batches, dims=(0, 2, 3), reduce=reduce)
        if count == 0:
            msg = "fit_feature_statistics got no images: the training set is empty."
            raise ValueError(msg)
        # A channel that never varies (e.g. a ReLU that is always off) keeps its scale instead of exploding.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(std.float())
        self.feature_statistics_fitted.fill_(True)

    @torch.no_grad()
    def fit_map_statistics(self, features: Iterable[torch.Tensor], reduce: SumReduce | None = None) -> None:
        """Set the per-pixel mean and standard deviation of the maps of batches of normal training features.

        The reconstructor runs in eval mode (no dropout, no jitter), as at test time; float64 sums over images,
        so the result does not depend on batching. ``reduce``: as in :meth:`fit_feature_statistics`.

        Args:
            features: Batches of features of normal training images, from :meth:`extract_features`.
            reduce: Sums a tensor over processes; ``None`` in a single process.
        """
        was_training = self.reconstructor.training
        self.reconstructor.eval()
        try:
            maps = (torch.cat(self.raw_maps(batch, self.reconstruct(batch)), dim=1) for batch in features)
            mean, std = per_pixel_statistics(maps, reduce)
        finally:
            self.reconstructor.train(was_training)
        self.map_mean.copy_(mean)
        self.map_std.copy_(std)
        self.map_statistics_fitted.fill_(True)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct features with the transformer.

        Args:
            features: ``(B, C, h, w)`` features from :meth:`extract_features`.

        Returns:
            The reconstructed features, the same shape.
        """
        return self.reconstructor(features)

    def raw_maps(self, features: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixel map (``map_layers``) and the map of all stages, ``(B, 1, H, W)`` each, before ``normalize_map``.

        Args:
            features: ``(B, C, h, w)`` features from :meth:`extract_features`.
            reconstruction: Their reconstruction from :meth:`reconstruct`.

        Returns:
            ``(pixel_map, score_map)``; the same tensor twice when ``map_layers`` covers every stage.
        """
        full = self.anomaly_map_generator.compute_anomaly_map(features, reconstruction, self.input_size)
        if self.map_is_all:
            return full, full
        pixel = self.anomaly_map_generator.compute_anomaly_map(
            self.map_features(features), self.map_features(reconstruction), self.input_size
        )
        return pixel, full

    def map_features(self, features: torch.Tensor) -> torch.Tensor:
        """The channels of ``map_layers`` out of ``(B, C, h, w)`` features.

        Args:
            features: Features or their reconstruction.

        Returns:
            The map's channels, in order.
        """
        parts = [features[:, start:stop] for start, stop in self.map_slices]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Training: ``(features, reconstruction)``. Inference: ``InferenceBatch(pred_score, anomaly_map)``.

        Args:
            images: Pre-processed ``(B, 3, H, W)`` images at the model's ``input_size``.

        Returns:
            In training, the features and their reconstruction, for the loss. Otherwise ``(B,)`` image scores and
            ``(B, 1, H, W)`` anomaly maps, standardised per pixel when ``normalize_map`` is on.
        """
        features = self.extract_features(images)
        reconstruction = self.reconstruct(features)
        if self.training:
            return features, reconstruction
        anomaly_map, score_map = self.raw_maps(features, reconstruction)
        if self.normalize_map:
            anomaly_map = (anomaly_map - self.map_mean[0]) / self.map_std[0]
            score_map = (score_map - self.map_mean[1]) / self.map_std[1]
        return InferenceBatch(pred_score=self.anomaly_map_generator.compute_score(score_map), anomaly_map=anomaly_map)


def _validate(
    backbone: str,
    layers: list[str],
    map_layers: Sequence[str] | None,
    input_size: tuple[int, int],
    feature_stride: int,
    patch_size: int,
    reconstructor: str,
    hidden_dim: int,
    num_heads: int,
    pooling_kernel: int,
    dropout: float,
    attention_dropout: str,
    feature_jitter: float,
    neighbor_mask: int,
    attention_locality: float,
) -> list[int]:
    """Reject impossible settings before any weights are built or downloaded; return the stage indices."""
    available = backbone_stages(backbone)
    if not layers:
        msg = "layers is empty: give at least one backbone stage, e.g. ['blocks.2', 'blocks.4']."
        raise ValueError(msg)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        msg = f"layers {unknown} do not exist in backbone {backbone!r}. Available stages: {available}."
        raise ValueError(msg)
    outside = [layer for layer in map_layers or () if layer not in layers]
    if outside or (map_layers is not None and not map_layers):
        msg = f"map_layers must be a non-empty subset of layers {layers}; {outside or 'empty'} is not."
        raise ValueError(msg)
    if feature_stride < 1 or min(input_size) < feature_stride:
        msg = f"input_size {tuple(input_size)} must be at least feature_stride ({feature_stride}) on each side."
        raise ValueError(msg)
    grid = (input_size[0] // feature_stride, input_size[1] // feature_stride)
    if patch_size < 1 or grid[0] % patch_size or grid[1] % patch_size:
        msg = (
            f"patch_size ({patch_size}) must be >= 1 and divide the feature grid {grid[0]}x{grid[1]} "
            f"(input_size {tuple(input_size)} / feature_stride {feature_stride}); e.g. patch_size 2 needs image "
            f"sides that are multiples of {2 * feature_stride}."
        )
        raise ValueError(msg)
    if reconstructor not in RECONSTRUCTORS:
        msg = f"reconstructor must be one of {list(RECONSTRUCTORS)}, got {reconstructor!r}."
        raise ValueError(msg)
    tokens = (grid[0] // patch_size, grid[1] // patch_size)
    if reconstructor == "cnn" and (tokens[0] % 4 or tokens[1] % 4):
        msg = (
            f"reconstructor 'cnn' halves the token grid twice, so its sides must be multiples of 4; got "
            f"{tokens[0]}x{tokens[1]} (input_size {tuple(input_size)} / feature_stride {feature_stride} / patch_size "
            f"{patch_size}). Use a larger input_size or a smaller feature_stride."
        )
        raise ValueError(msg)
    if hidden_dim % num_heads:
        msg = f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})."
        raise ValueError(msg)
    if not 1 <= pooling_kernel <= min(input_size):
        msg = f"pooling_kernel ({pooling_kernel}) must be between 1 and the smallest image side ({min(input_size)})."
        raise ValueError(msg)
    if not 0.0 <= dropout < 1.0:
        msg = f"dropout must be in [0, 1), got {dropout}."
        raise ValueError(msg)
    if attention_dropout not in ATTENTION_DROPOUTS:
        msg = f"attention_dropout must be one of {list(ATTENTION_DROPOUTS)}, got {attention_dropout!r}."
        raise ValueError(msg)
    if not 0.0 <= feature_jitter < float("inf"):
        msg = f"feature_jitter must be a finite number >= 0 (UniAD: 20), got {feature_jitter}."
        raise ValueError(msg)
    if not 0.0 <= attention_locality < float("inf"):
        msg = f"attention_locality must be a finite number >= 0 (0: off), got {attention_locality}."
        raise ValueError(msg)
    if neighbor_mask < 0 or (neighbor_mask and neighbor_mask % 2 == 0):
        msg = f"neighbor_mask must be 0 (off) or an odd number of token positions (UniAD: 7), got {neighbor_mask}."
        raise ValueError(msg)
    if (neighbor_mask or attention_locality) and reconstructor not in {"transformer", "no_query"}:
        msg = f"neighbor_mask and attention_locality bias attention, which reconstructor {reconstructor!r} has none of."
        raise ValueError(msg)
    if neighbor_mask and all(neighbor_mask // 2 >= side // 2 for side in tokens):  # the middle token's block is all
        msg = (
            f"neighbor_mask ({neighbor_mask}) covers the whole token grid {tokens[0]}x{tokens[1]} for its middle "
            "tokens, which would have nothing left to attend to: use a smaller neighbor_mask or a larger input."
        )
        raise ValueError(msg)
    return [available.index(layer) for layer in layers]
