"""Transformer pieces of the Stable Diffusion UNet, named as in CompVis ``ldm.modules.attention``.

Module names (``to_q``/``to_k``/``to_v``/``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``,
``norm1``..``norm3``, ``norm``/``proj_in``/``proj_out``) match the original checkpoints (and
diffusers' ``Transformer2DModel``, whose inner names are the same), so state dicts load unchanged.

Attention runs through :func:`torch.nn.functional.scaled_dot_product_attention` with no mask: SD's
CLIP conditioning attends to all 77 tokens, padding included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.layers import group_norm


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (itself when no context is given).

    Args:
        query_dim: Channels of the queries ``x`` (and of the output).
        context_dim: Channels of the keys/values source; ``None`` means self-attention on ``x``.
        heads: Number of attention heads.
        dim_head: Channels per head; the inner width is ``heads * dim_head``.
        dropout: Dropout after the output projection.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.query_chunk_size: int | None = None  # attention slicing: queries per chunk (None = all at once)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, dim_head)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Attend ``x`` (B, N, query_dim) over ``context`` (B, L, context_dim), or over ``x`` if ``None``."""
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        chunk = self.query_chunk_size
        if chunk is None or chunk >= q.shape[2]:
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(dim_head), no mask
        else:  # peak memory of the attention matrix shrinks by q_len / chunk
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v) for i in range(0, q.shape[2], chunk)], dim=2)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU: one Linear to twice the width, ``value * gelu(gate)`` (exact, erf-based GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """SD's transformer MLP: ``net = [GEGLU(dim -> mult*dim), Dropout, Linear(mult*dim -> dim)]``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context, gated feed-forward.

    Args:
        dim: Token channels.
        n_heads: Attention heads in both attentions.
        d_head: Channels per head.
        context_dim: Channels of the conditioning tokens; ``None`` makes ``attn2`` a second
            self-attention over ``x`` (CompVis' behaviour without a context).
        dropout: Dropout in attention outputs and the feed-forward.
        use_checkpoint: Recompute this block in the backward pass (when grad is enabled) to save memory.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = use_checkpoint

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Transform tokens ``x`` (B, N, dim) given ``context`` (B, L, context_dim) or ``None``."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around the whole stack.

    GroupNorm (eps 1e-6) -> ``proj_in`` -> ``depth`` BasicTransformerBlocks -> ``proj_out`` (+ input).

    Args:
        in_channels: Channels of the feature map.
        n_heads: Attention heads.
        d_head: Channels per head; the inner width is ``n_heads * d_head``.
        depth: Number of transformer blocks.
        context_dim: Channels of the conditioning tokens (``None``: no cross-attention, see
            :class:`BasicTransformerBlock`).
        dropout: Dropout inside the blocks.
        use_linear: Project in/out with Linear layers on tokens (SD v2) instead of 1x1 convs (SD v1).
        norm_groups: Upper bound on GroupNorm groups (reduced to divide ``in_channels``).
        use_checkpoint: Gradient checkpointing of each transformer block.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = group_norm(in_channels, norm_groups, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout, use_checkpoint) for _ in range(depth)
        )
        proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(proj_out.weight)  # CompVis zero-initialises the residual branch's last layer
        nn.init.zeros_(proj_out.bias)
        self.proj_out = proj_out

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Apply to ``x`` (B, C, H, W) with ``context`` (B, L, context_dim) or ``None``."""
        b, _, h, w = x.shape
        t = self.norm(x)
        if not self.use_linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.use_linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            t = self.proj_out(t)
        return x + t
