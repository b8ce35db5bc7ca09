"""PyTorch model for ADTR: frozen CNN features reconstructed by a query-based transformer.

Example:
    >>> import torch
    >>> from adtr_anomalib.models.adtr.torch_model import ADTRModel
    >>> model = ADTRModel(backbone="tf_efficientnet_lite0", pre_trained=False, input_size=(64, 64)).eval()
    >>> model(torch.rand(2, 3, 64, 64)).anomaly_map.shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adtr_anomalib.models.components import backbone_stages, load_backbone_weights

from .anomaly_map import AnomalyMapGenerator

# EfficientNet stages 1-5 in timm's ``features_only`` naming (paper: all five, C = 720 for B4).
DEFAULT_LAYERS: tuple[str, ...] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")


class _EncoderLayer(nn.Module):
    """Post-norm self-attention layer with the positional embedding added to queries and keys.

    Written by hand because ``nn.TransformerEncoderLayer`` cannot add the embedding inside attention,
    as DETR/UniAD (and ADTR) do, without also adding it to the values.
    """

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        query = tokens + pos
        attended = self.self_attn(query, query, tokens, need_weights=False)[0]
        return self.ffn(self.norm(tokens + self.dropout(attended)))


class _DecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the encoded features, then the FFN."""

    def __init__(self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = _FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = queries + pos
        queries = self.norm1(queries + self.dropout1(self.self_attn(q, q, queries, need_weights=False)[0]))
        attended = self.cross_attn(queries + pos, memory + pos, memory, need_weights=False)[0]
        return self.ffn(self.norm2(queries + self.dropout2(attended)))


class _FeedForward(nn.Module):
    """``hidden -> ffn -> hidden`` with ReLU, residual and LayerNorm."""

    def __init__(self, hidden_dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_dim, ffn_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, hidden_dim),
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens + self.dropout(self.net(tokens)))


class ADTRReconstructor(nn.Module):
    """Transformer encoder-decoder that rebuilds a feature map from a learnable query embedding.

    The decoder starts from the query embedding, not from the features: a network that could copy its
    input would reconstruct anomalies too (the "identical mapping" shortcut, paper Sec. 3.2).

    Args:
        in_channels: Channels ``C`` of the concatenated backbone features.
        num_tokens: ``h * w`` positions of the feature grid.
        hidden_dim, num_encoder_layers, num_decoder_layers, num_heads, ffn_dim, dropout: transformer sizes.
    """

    def __init__(
        self,
        in_channels: int,
        num_tokens: int,
        hidden_dim: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_channels, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, in_channels)
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, hidden_dim))
        self.query_embed = nn.Parameter(torch.empty(1, num_tokens, hidden_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query_embed, std=0.02)
        self.encoder = nn.ModuleList(
            _EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            _DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout) for _ in range(num_decoder_layers)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, C, h, w)`` features."""
        batch, _, height, width = features.shape
        tokens = self.input_proj(features.flatten(2).transpose(1, 2))
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, self.pos_embed)
        queries = self.query_embed.expand(batch, -1, -1)
        for layer in self.decoder:
            queries = layer(queries, memory, self.pos_embed)
        out = self.output_proj(queries)
        return out.transpose(1, 2).reshape(batch, -1, height, width)


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
        hidden_dim, num_encoder_layers, num_decoder_layers, num_heads, ffn_dim, dropout: Transformer
            sizes. Paper: 256, 4, 4, 8, 1024, 0.1.
        pooling_kernel: Averaging window for the image score, in pixels. UniAD: 16.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        layers: Sequence[str] = DEFAULT_LAYERS,
        pre_trained: bool = True,
        weights: str | Path | None = None,
        input_size: tuple[int, int] = (256, 256),
        feature_stride: int = 16,
        hidden_dim: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        pooling_kernel: int = 16,
    ) -> None:
        super().__init__()
        layers = list(layers)
        indices = _validate(
            backbone, layers, input_size, feature_stride, hidden_dim, num_heads, pooling_kernel, dropout
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
            num_tokens=self.feature_grid[0] * self.feature_grid[1],
            hidden_dim=hidden_dim,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
        self.anomaly_map_generator = AnomalyMapGenerator(pooling_kernel=pooling_kernel)
        # Persistent flag, so a model restored from a checkpoint never fetches backbone weights again.
        self.register_buffer("backbone_weights_loaded", torch.tensor(False))
        if pre_trained or weights is not None:
            self.load_backbone_weights(weights)

    @property
    def num_channels(self) -> int:
        """Channels ``C`` of the concatenated multi-scale feature map."""
        return sum(self.feature_extractor.out_dims)

    def load_backbone_weights(self, weights: str | Path | None = None) -> str:
        """Load ImageNet weights into the frozen backbone; returns where they came from."""
        source = load_backbone_weights(self.feature_extractor.feature_extractor, self.backbone, weights)
        self.backbone_weights_loaded.fill_(True)
        return source

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen multi-scale features, each stage resized to the stride-16 grid and concatenated.

        Bilinear with ``align_corners=True`` for every stage, down-sampling included, as UniAD does.
        """
        if tuple(images.shape[-2:]) != self.input_size:
            msg = (
                f"ADTR was built for {self.input_size[0]}x{self.input_size[1]} inputs but got "
                f"{images.shape[-2]}x{images.shape[-1]}. Resize images in the pre-processor to the model's size."
            )
            raise ValueError(msg)
        with torch.no_grad():
            stages = self.feature_extractor(images).values()
            resized = [F.interpolate(f, size=self.feature_grid, mode="bilinear", align_corners=True) for f in stages]
        return torch.cat(resized, dim=1)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct features with the transformer."""
        return self.reconstructor(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Training: ``(features, reconstruction)``. Inference: ``InferenceBatch(pred_score, anomaly_map)``."""
        features = self.extract_features(images)
        reconstruction = self.reconstruct(features)
        if self.training:
            return features, reconstruction
        anomaly_map, pred_score = self.anomaly_map_generator(features, reconstruction, images.shape[-2:])
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)


def _validate(
    backbone: str,
    layers: list[str],
    input_size: tuple[int, int],
    feature_stride: int,
    hidden_dim: int,
    num_heads: int,
    pooling_kernel: int,
    dropout: float,
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
    if feature_stride < 1 or min(input_size) < feature_stride:
        msg = f"input_size {tuple(input_size)} must be at least feature_stride ({feature_stride}) on each side."
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
    return [available.index(layer) for layer in layers]
