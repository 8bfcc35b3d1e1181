"""The contract every attention operator of the studio follows.

An operator is an `nn.Module` built as `cls(dim, num_heads, **options)` and called on the
adaLN-modulated tokens `h` of shape (N, T, D) with the token grid `(H, W)`; it returns (N, T, D),
which the block gates and adds to the residual stream (DiT's adaLN-Zero attention branch).

Operators that need more than one branch per block (PT-DiT's proxy and shifted-window paths) may
override `pre_attention(x, c, ctx)` / `post_attention(x, c, ctx)`, which receive and return the
residual stream itself and the conditioning vector `c` (N, D). Both default to identity.
"""
from __future__ import annotations

import math
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

    def prepare(self, grid: tuple[int, int], device: torch.device, batch: int | None = None,
                dtype: torch.dtype | None = None) -> None:
        """Build per-geometry constants (token orders, masks) for inputs of `batch` samples on this grid whose
        attention runs in `dtype` (the autocast dtype under autocast), in eager code before the blocks run;
        default none.

        `DiT.forward` calls it outside the compiled region, so that compiled blocks read shared constants
        (`dit.attention.constants`) instead of building them inside every graph."""

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return x

    def post_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return x

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """This operator's multiply-adds for one sample (DiT paper convention), as
        {"projections", "products", "other", "conditioning", "total"}: "products" are the token-mixing
        matmuls (QK^T, AV and their equivalents), "conditioning" per-sample Linears on c.

        Every operator owns its cost: override this (or `flops`); `dit.flops` only sums what operators report.
        """
        if type(self).flops is AttentionOp.flops:
            raise NotImplementedError(f"attention operator {type(self).__name__} reports no cost: "
                                      "implement flops_breakdown(num_tokens, grid)")
        total = float(self.flops(num_tokens))
        return {"projections": 0.0, "products": 0.0, "other": total, "conditioning": 0.0, "total": total}

    def flops(self, num_tokens: int, grid: tuple[int, int] | None = None) -> float:
        """Multiply-adds of one forward for one sample, attention products included (the DiT paper's Gflops)."""
        return float(self.flops_breakdown(num_tokens, grid)["total"])


def square_grid(tokens: int) -> tuple[int, int]:
    """(side, side) for a square token count (the default grid of operators' cost formulas)."""
    side = math.isqrt(int(tokens))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid; pass grid=(H, W)")
    return side, side


def breakdown(projections: float = 0.0, products: float = 0.0, other: float = 0.0,
              conditioning: float = 0.0) -> dict[str, float]:
    """A cost breakdown dict with its total."""
    parts = {"projections": float(projections), "products": float(products), "other": float(other),
             "conditioning": float(conditioning)}
    parts["total"] = sum(parts.values())
    return parts
