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
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from adtr_anomalib.models.components import backbone_stages, load_backbone_weights

from .anomaly_map import AnomalyMapGenerator

# Sums a tensor over the processes of a distributed run (identity in one process): statistics fitted on each
# process's shard of the training set then equal those of the whole set.
SumReduce = Callable[[torch.Tensor], torch.Tensor]

# EfficientNet stages 1-5 in timm's ``features_only`` naming (paper: all five, C = 720 for B4).
DEFAULT_LAYERS: tuple[str, ...] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")
# What rebuilds the features (paper Table 4): the transformer with a learnable query (ADTR), the same transformer
# whose decoder starts from the encoder output ("without query"), its feed-forward blocks alone ("without
# attention"), or a plain convolutional autoencoder.
ReconstructorKind = Literal["transformer", "no_query", "mlp", "cnn"]
RECONSTRUCTORS: tuple[str, ...] = get_args(ReconstructorKind)
# How attention dropout drops in training: "weights" (paper; PyTorch's own: each attention weight alone, which needs
# PyTorch's unfused attention and one random number per weight) or "keys": whole keys per image and head, masked
# before the softmax (DropKey, Li et al., CVPR 2023), which PyTorch's fused attention kernel accepts as a mask.
AttentionDropout = Literal["weights", "keys"]
ATTENTION_DROPOUTS: tuple[str, ...] = get_args(AttentionDropout)
# The locality penalty (``attention_locality``) saturates here. A key this far below the query's own logit weighs at
# most e^-60 (about 1e-26) of it: nothing in float32 sums. Unsaturated, the far keys' exponentials fall below float32's
# normal range, and x86 CPUs compute such subnormal numbers many times slower: the attention of the recommended recipe
# took 112 ms instead of 23 (forward and backward, one layer, batch 16, AMX Xeon).
LOCALITY_BIAS_FLOOR = -60.0
# Buffers of ADTRModel that hold the per-channel feature statistics (``normalize_features``).
FEATURE_STATISTICS: tuple[str, ...] = ("feature_mean", "feature_std", "feature_statistics_fitted")
# Buffers of ADTRModel that hold the per-pixel statistics of the training images' anomaly maps (``normalize_map``).
MAP_STATISTICS: tuple[str, ...] = ("map_mean", "map_std", "map_statistics_fitted")


class _Attention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, same parameters) whose dropout can drop whole keys instead of weights.

    ``attention_dropout="keys"`` hands PyTorch an additive mask of ``-inf`` on each dropped key, one draw per image,
    head and key, so the fused attention kernel runs: it refuses dropout of single weights, and drawing one number
    per weight costs more than the attention's matrix products on a CPU. Only in training; inference is unchanged.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float, attention_dropout: AttentionDropout) -> None:
        weights = attention_dropout == "weights"
        super().__init__(hidden_dim, num_heads, dropout=dropout if weights else 0.0, batch_first=True)
        self.key_dropout = 0.0 if weights else dropout

    def forward(  # type: ignore[override]
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``query`` to ``key``/``value`` (``(B, N, hidden_dim)`` each); only the output is returned.

        ``bias``: optional ``(Nq, Nk)`` additive bias on the attention logits (see :func:`attention_bias`).
        """
        mask = bias
        if self.training and self.key_dropout > 0:
            batch, queries, keys = query.shape[0], query.shape[1], key.shape[1]
            dropped = torch.rand(batch * self.num_heads, 1, keys, device=query.device) < self.key_dropout
            base = bias if bias is not None else query.new_zeros(queries, keys)
            mask = base.expand(len(dropped), -1, -1).masked_fill(dropped, float("-inf"))
            # A query with no key left would give NaN: it keeps every key that the bias allows.
            mask = torch.where(mask.isneginf().all(dim=-1, keepdim=True), base, mask)
        if mask is not None:
            mask = mask.to(query.dtype)
        if self.dropout == 0.0 and query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            return self.attend_in_float32(query, key, value, mask)
        return super().forward(query, key, value, attn_mask=mask, need_weights=False)[0]

    def attend_in_float32(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The same attention with the projections left to autocast (bf16) and the attention itself in float32.

        For CPU training under bf16 autocast: PyTorch's fused CPU attention kernel computes its backward pass about
        three times slower in bf16 than in float32 (92 ms against 32 ms for one layer at batch 16 on an AMX Xeon),
        and it was a third of a training step. ``nn.MultiheadAttention`` gives no way to choose the attention's
        precision apart from the projections', hence this second path over the same parameters. ``mask``: additive,
        ``(Nq, Nk)`` or ``(B * heads, Nq, Nk)``.
        """
        heads = self.num_heads

        def split(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return F.linear(tokens, weight, bias).unflatten(-1, (heads, -1)).transpose(1, 2).float()

        q, k, v = (
            split(tokens, weight, bias)
            for tokens, weight, bias in zip(
                (query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3), strict=True
            )
        )
        if mask is not None:  # (Nq, Nk) broadcasts; (B * heads, Nq, Nk) is split into its batch and heads
            mask = (mask.reshape(q.shape[0], heads, *mask.shape[1:]) if mask.dim() == 3 else mask).float()
        with torch.autocast("cpu", enabled=False):
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class _EncoderLayer(nn.Module):
    """Post-norm self-attention layer with the positional embedding added to queries and keys.

    Written by hand because ``nn.TransformerEncoderLayer`` cannot add the embedding inside attention,
    as DETR/UniAD (and ADTR) do, without also adding it to the values.
    """

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: AttentionDropout
    ) -> None:
        super().__init__()
        self.self_attn = _Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.ffn = _FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        query = tokens + pos
        return self.ffn(self.norm(tokens + self.dropout(self.self_attn(query, query, tokens, bias))))


class _DecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the encoded features, then the FFN."""

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: AttentionDropout
    ) -> None:
        super().__init__()
        self.self_attn = _Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.cross_attn = _Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.ffn = _FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = queries + pos
        queries = self.norm1(queries + self.dropout1(self.self_attn(q, q, queries, bias)))
        attended = self.cross_attn(queries + pos, memory + pos, memory, bias)
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


class _ConvAutoencoder(nn.Module):
    """The paper's "plain CNN" baseline on the token grid: two stride-2 3x3 convolutions down, two 2x2 transposed
    convolutions back up, ``hidden_dim`` wide. Its bottleneck (a quarter of the grid on each side) is what keeps it
    from copying its input; nothing in it knows which features are normal."""

    def __init__(self, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.ConvTranspose2d(hidden_dim, hidden_dim, 2, stride=2),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden_dim, hidden_dim, 2, stride=2),
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.net(grid)


class ADTRReconstructor(nn.Module):
    """Transformer encoder-decoder that rebuilds a feature map from a learnable query embedding.

    The decoder starts from the query embedding, not from the features: a network that could copy its
    input would reconstruct anomalies too (the "identical mapping" shortcut, paper Sec. 3.2).

    Args:
        in_channels: Channels ``C`` of the concatenated backbone features.
        num_tokens: ``h * w`` positions of the feature grid.
        hidden_dim, num_encoder_layers, num_decoder_layers, num_heads, ffn_dim, dropout: transformer sizes.
        feature_jitter: Scale of UniAD's feature jitter, added to the input features in training only: Gaussian
            noise with a per-position standard deviation of ``feature_jitter * ||f(:, u)|| / C``. The target stays
            the clean features, so the network learns to pull noisy inputs back to normal ones. 0 (paper) is off.
        patch_size: Each token carries a ``patch_size x patch_size`` block of grid positions (as a ViT patch) and
            reconstructs all of them. With ``feature_stride`` 8 and ``patch_size`` 2 the anomaly map is on a
            stride-8 grid while attention still runs over stride-16 tokens (a quarter of the positions: attention
            costs grow with their square). 1 (paper): one token per position.
        kind: ``"transformer"`` (ADTR), or one of the paper's ablations (Table 4): ``"no_query"`` (the decoder
            starts from the encoder output, so it can learn to copy), ``"mlp"`` (the encoder and decoder layers'
            feed-forward blocks, no attention) or ``"cnn"`` (a convolutional autoencoder on the token grid).
        attention_dropout: ``"weights"`` (paper) or ``"keys"``: what attention dropout drops (see
            :class:`_Attention`); the feed-forward and residual dropouts are the same in both.
        neighbor_mask: UniAD's neighbourhood mask: in every attention, no token sees the tokens in the
            ``neighbor_mask x neighbor_mask`` block of token positions centred on its own, so each position is
            rebuilt from its surroundings rather than from itself. Odd; 0 (paper) is off. UniAD: 7.
        attention_locality: In every attention, ``attention_locality`` times the squared distance between the two
            tokens' grid positions is subtracted from the logit (a fixed, 2-D form of ALiBi's distance penalty), so
            attention starts out local: at 1, a token one position away weighs ``e^-1`` of an equal-scoring token at
            the query's own position. The decoder still starts from the learnable query. 0 (paper) is off.
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
        feature_jitter: float = 0.0,
        patch_size: int = 1,
        kind: ReconstructorKind = "transformer",
        attention_dropout: AttentionDropout = "weights",
        neighbor_mask: int = 0,
        attention_locality: float = 0.0,
    ) -> None:
        super().__init__()
        self.feature_jitter = feature_jitter
        self.neighbor_mask = neighbor_mask
        self.attention_locality = attention_locality
        self.patch_size = patch_size
        self.kind = kind
        self.input_proj = nn.Linear(in_channels * patch_size**2, hidden_dim)
        self.output_proj = nn.Linear(hidden_dim, in_channels * patch_size**2)
        if kind != "cnn":  # convolutions know positions; an unused parameter would also stall DDP
            self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, hidden_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if kind == "transformer":
            self.query_embed = nn.Parameter(torch.empty(1, num_tokens, hidden_dim))
            nn.init.trunc_normal_(self.query_embed, std=0.02)
        layers = num_encoder_layers, num_decoder_layers
        if kind in {"transformer", "no_query"}:
            self.encoder = nn.ModuleList(
                _EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout, attention_dropout) for _ in range(layers[0])
            )
            self.decoder = nn.ModuleList(
                _DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, attention_dropout) for _ in range(layers[1])
            )
        elif kind == "mlp":
            self.mixer = nn.Sequential(*(_FeedForward(hidden_dim, ffn_dim, dropout) for _ in range(sum(layers))))
        else:
            self.mixer = _ConvAutoencoder(hidden_dim, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``(B, C, h, w)`` features.

        Args:
            features: Backbone features on the feature grid; jittered first in training when ``feature_jitter`` is on.

        Returns:
            The reconstruction, the same shape as ``features``.
        """
        batch, channels, height, width = features.shape
        patch = self.patch_size
        if self.training and self.feature_jitter > 0:
            features = self.add_jitter(features)
        # The projections run as convolutions on the grid with the Linear layers' weights: the same sums as
        # pixel_unshuffle + Linear and Linear + pixel_shuffle, but only the hidden_dim-wide tokens are transposed,
        # not the C * p * p-wide features (their transposes took a tenth of OpenVINO's time at batch 16).
        weight = self.input_proj.weight.view(-1, channels, patch, patch)
        tokens = F.conv2d(features, weight, self.input_proj.bias, stride=patch).flatten(2).transpose(1, 2)
        grid = (
            self.mix(tokens, (height // patch, width // patch))
            .transpose(1, 2)
            .reshape(batch, -1, height // patch, width // patch)
        )
        weight = self.output_proj.weight.t().reshape(-1, channels, patch, patch)
        # The bias differs per position within a patch, so it is tiled over the grid, not a per-channel bias.
        bias = self.output_proj.bias.view(1, channels, patch, patch).repeat(1, 1, height // patch, width // patch)
        return F.conv_transpose2d(grid, weight, stride=patch) + bias

    def mix(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Rebuild ``(B, N, hidden_dim)`` tokens with the chosen ``kind`` of network.

        Args:
            tokens: The projected input tokens.
            grid: ``(rows, columns)`` of the tokens (``N = rows * columns``), for ``"cnn"``.

        Returns:
            The rebuilt tokens, the same shape.
        """
        if self.kind == "mlp":
            return self.mixer(tokens + self.pos_embed)
        if self.kind == "cnn":
            return self.mixer(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)).flatten(2).transpose(1, 2)
        bias = attention_bias(grid, self.neighbor_mask, self.attention_locality, tokens.device)
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, self.pos_embed, bias)
        # Without the query the decoder starts from what it should rebuild: the "identical mapping" shortcut.
        queries = self.query_embed.expand(tokens.shape[0], -1, -1) if self.kind == "transformer" else memory
        for layer in self.decoder:
            queries = layer(queries, memory, self.pos_embed, bias)
        return queries

    def add_jitter(self, features: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """UniAD's feature jitter: Gaussian noise proportional to each position's norm / C.

        Args:
            features: Features with the ``C`` channels along ``dim``.
            dim: The channel dimension (1: ``(B, C, h, w)``).

        Returns:
            ``features`` plus the noise, the same shape. The noise is drawn in ``features``' own memory order: drawn
            through a transposed view it took about seven times as long (a fifth of a stride-8 training step).
        """
        scale = features.norm(dim=dim, keepdim=True) * (self.feature_jitter / features.shape[dim])
        return features + torch.randn_like(features) * scale


def attention_bias(
    grid: tuple[int, int], neighbor_mask: int = 0, locality: float = 0.0, device: torch.device | None = None
) -> torch.Tensor | None:
    """The additive bias on the attention logits between the tokens of a grid: none unless one of the two is on.

    Args:
        grid: ``(rows, columns)`` of the token grid (``N = rows * columns`` tokens, row-major).
        neighbor_mask: Odd side of the block of token positions, centred on each query, that it may not see (``-inf``;
            UniAD's neighbourhood mask); 0: none.
        locality: Subtracted from each logit per unit of squared distance between the two tokens' positions, down to
            :data:`LOCALITY_BIAS_FLOOR`.
        device: Where the bias is made.

    Returns:
        ``(N, N)`` float bias (query rows, key columns), or ``None`` when both are off. Computed from the grid on
        every call, as an exported graph then holds it as a constant for its input size.
    """
    if not neighbor_mask and not locality:
        return None
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1])
    columns = torch.arange(grid[1], device=device).repeat(grid[0])
    row_distance, column_distance = (rows[:, None] - rows[None]).abs(), (columns[:, None] - columns[None]).abs()
    bias = (-locality * (row_distance.square() + column_distance.square()).float()).clamp(min=LOCALITY_BIAS_FLOOR)
    if neighbor_mask:
        reach = neighbor_mask // 2
        bias = bias.masked_fill((row_distance <= reach) & (column_distance <= reach), float("-inf"))
    return bias


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


@torch.no_grad()
def per_pixel_statistics(
    maps: Iterable[torch.Tensor], reduce: SumReduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over images of batches of ``(B, K, H, W)`` maps, each ``(K, H, W)``.

    Sums in float64, so the result does not depend on batching; ``reduce`` sums them over processes. The deviation
    has a floor of 0.1% of its mean: a pixel where every normal map agrees (a flat background) must not turn noise
    into huge scores.

    Args:
        maps: Batches of ``(B, K, H, W)`` anomaly maps.
        reduce: Sums a tensor over processes; ``None`` in a single process.

    Returns:
        The per-pixel mean and floored standard deviation, ``(K, H, W)`` each, in float32.

    Raises:
        ValueError: If there are fewer than 2 images in all.
    """
    count, mean, std = moments(maps, dims=(0,), reduce=reduce)
    if count < 2:
        msg = f"map statistics need at least 2 normal training images for a standard deviation, got {count}."
        raise ValueError(msg)
    std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
    return mean.float(), std.float()


@torch.no_grad()
def moments(
    batches: Iterable[torch.Tensor], dims: tuple[int, ...], reduce: SumReduce | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and standard deviation of batches over ``dims`` (the statistics of features and of maps).

    Sums of values and squares in float64, so the result does not depend on batching; ``reduce`` sums them over
    processes, where each has seen its own shard.

    Args:
        batches: Tensors of one shape but for the sizes along ``dims``.
        dims: The dimensions summed over (images and, for per-channel statistics, positions).
        reduce: Sums a tensor over processes; ``None`` in a single process.

    Returns:
        The number of values summed per entry (0 for no batches), the mean and the population standard deviation,
        float64, of the shape without ``dims`` (empty tensors for no batches).
    """
    count = torch.zeros((), dtype=torch.float64)
    first: torch.Tensor | float = 0.0
    second: torch.Tensor | float = 0.0
    for batch in batches:
        values = batch.double()
        count += math.prod(values.shape[d] for d in dims)
        first = first + values.sum(dim=dims)
        second = second + values.pow(2).sum(dim=dims)
    if not isinstance(first, torch.Tensor):
        return 0, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
    if reduce is not None:
        count, first, second = (reduce(value) for value in (count, first, second))
    mean = first / count.to(first.device)
    std = (second / count.to(first.device) - mean.pow(2)).clamp_min(0).sqrt()
    return int(count), mean, std


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
