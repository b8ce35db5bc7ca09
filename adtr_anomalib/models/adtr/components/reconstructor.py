"""ADTR's reconstructor: a transformer encoder-decoder that rebuilds the features from a learnable query, and the
paper's Table 4 ablations of it (no query, no attention, a convolutional autoencoder)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .transformer import AttentionDropout, DecoderLayer, EncoderLayer, FeedForward, attention_bias

# What rebuilds the features (paper Table 4): the transformer with a learnable query (ADTR), the same transformer
# whose decoder starts from the encoder output ("without query"), its feed-forward blocks alone ("without
# attention"), or a plain convolutional autoencoder.
ReconstructorKind = Literal["transformer", "no_query", "mlp", "cnn"]
RECONSTRUCTORS: tuple[str, ...] = get_args(ReconstructorKind)


class ConvAutoencoder(nn.Module):
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
            :class:`Attention`); the feed-forward and residual dropouts are the same in both.
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
                EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout, attention_dropout) for _ in range(layers[0])
            )
            self.decoder = nn.ModuleList(
                DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, attention_dropout) for _ in range(layers[1])
            )
        elif kind == "mlp":
            self.mixer = nn.Sequential(*(FeedForward(hidden_dim, ffn_dim, dropout) for _ in range(sum(layers))))
        else:
            self.mixer = ConvAutoencoder(hidden_dim, dropout)

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
