"""The contract every attention operator of the studio follows.

An operator is an `nn.Module` built as `cls(dim, num_heads, **options)` and called on the
adaLN-modulated tokens `h` of shape (N, T, D) with the token grid `(H, W)`; it returns (N, T, D),
which the block gates and adds to the residual stream (DiT's adaLN-Zero attention branch).

Operators that need more than one branch per block (PT-DiT's proxy and shifted-window paths) may
override `pre_attention(x, c, ctx)` / `post_attention(x, c, ctx)`, which receive and return the
residual stream itself and the conditioning vector `c` (N, D). Both default to identity.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class BlockContext:
    """Per-forward information shared by all blocks: token grid and timestep embedding."""

    grid: tuple[int, int]
    t_emb: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class AttentionOp(nn.Module):
    """Base class of registered attention operators."""

    #: registry name, set by `register_attention`
    name: str = "base"

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return x

    def post_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return x

    def flops(self, num_tokens: int) -> float:
        """Multiply-adds of one forward for one sample, attention products included (the DiT paper's Gflops)."""
        raise NotImplementedError
