"""The transformer layers of ADTR's reconstructor, with the attention switches the recipes use.

The paper's layers are DETR's: post-norm, the positional embedding added to queries and keys inside attention. The
switches beside them (dropping whole keys instead of weights, a locality bias, UniAD's neighbourhood mask, float32
attention under bf16 autocast) change how fast a CPU trains them or what attention may see; all are off by default.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

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


class Attention(nn.MultiheadAttention):
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


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer with the positional embedding added to queries and keys.

    Written by hand because ``nn.TransformerEncoderLayer`` cannot add the embedding inside attention,
    as DETR/UniAD (and ADTR) do, without also adding it to the values.
    """

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: AttentionDropout
    ) -> None:
        super().__init__()
        self.self_attn = Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.ffn = FeedForward(hidden_dim, ffn_dim, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        query = tokens + pos
        return self.ffn(self.norm(tokens + self.dropout(self.self_attn(query, query, tokens, bias))))


class DecoderLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the encoded features, then the FFN."""

    def __init__(
        self, hidden_dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: AttentionDropout
    ) -> None:
        super().__init__()
        self.self_attn = Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.cross_attn = Attention(hidden_dim, num_heads, dropout, attention_dropout)
        self.ffn = FeedForward(hidden_dim, ffn_dim, dropout)
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


class FeedForward(nn.Module):
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
