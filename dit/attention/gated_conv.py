"""Gated-convolution token mixer with short filters (Hyena-style), the grafting paper's attention replacement.

Chandrasegaran et al. 2025 ("Exploring Diffusion Transformer Designs via Grafting", operators Hyena-SE /
Hyena-Y, after Poli et al. 2023 "Hyena Hierarchy"):

    [q, k, v] = Featurizer(in_proj(h))          in_proj D -> 3D; featurizer: depthwise short conv (Hyena-SE)
    y = q * InnerFilter(k * v)                  inner filter: depthwise short conv, identity at init
    out = proj(y)

`featurizer=False` gives Hyena-Y (no featurizer conv). Filters: `layout="2d"` (default) are depthwise
k x k convolutions on the token grid (zero padding, centred); `layout="1d"` is the paper's exact form,
causal depthwise conv1d of length k over tokens in raster order (it sees only raster predecessors, a
strong bias the reference notes flag for images). `filter_size` k (default 3; the paper's 1-D filters
have 4 taps). Both filters start as identity (delta at the centre / last tap), so a fresh operator
computes q * (k * v) token-wise and stage 1 learns the mixing.

Keys `qkv` (the in_proj, D -> 3D) and `proj` match DiT's softmax attention by shape, so grafting can start
from the trained attention's projections. Cost (multiply-adds per sample): projections 4 T D^2,
filters T (3D [featurizer] + D) k_eff with k_eff = k^2 (2-D) or k (1-D); the gating products are
element-wise (not counted, DiT convention). Linear in T.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp, breakdown

LAYOUTS = ("2d", "1d")


@register_attention("gated_conv")
class GatedConvMixer(AttentionOp):
    """Hyena-SE / Hyena-Y style gated short-convolution mixer (see the module doc).

    Options: `filter_size` (3), `featurizer` (True: Hyena-SE; False: Hyena-Y), `layout` ("2d" | "1d"),
    `qkv_bias` (True). `backend` is accepted for interface parity and unused.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", filter_size: int = 3, featurizer: bool = True,
                 layout: str = "2d", qkv_bias: bool = True, **_: Any):
        super().__init__()
        filter_size = int(filter_size)
        if layout not in LAYOUTS:
            raise ValueError(f"gated_conv: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if filter_size < 1 or (layout == "2d" and filter_size % 2 == 0):
            raise ValueError(f"gated_conv: filter_size must be a positive {'odd ' if layout == '2d' else ''}number "
                             f"for layout {layout!r}, got {filter_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.backend = backend
        self.filter_size = filter_size
        self.layout = layout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        shape = (filter_size, filter_size) if layout == "2d" else (filter_size,)
        self.featurizer = nn.Parameter(torch.zeros(3 * dim, 1, *shape)) if featurizer else None
        self.inner_filter = nn.Parameter(torch.zeros(dim, 1, *shape))
        self.proj = nn.Linear(dim, dim)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Identity filters: a delta at the centre (2-D) or at the last, current-token tap (causal 1-D)."""
        with torch.no_grad():
            for weight in (self.featurizer, self.inner_filter):
                if weight is None or weight.device.type == "meta":
                    continue
                weight.zero_()
                if self.layout == "2d":
                    weight[:, 0, self.filter_size // 2, self.filter_size // 2] = 1.0
                else:
                    weight[:, 0, -1] = 1.0

    def _filter(self, x: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Depthwise short conv of (N, T, C) tokens with a (C, 1, k[, k]) filter."""
        n, t, c = x.shape
        if self.layout == "2d":
            img = x.transpose(1, 2).reshape(n, c, grid[0], grid[1])
            return F.conv2d(img, weight, padding=self.filter_size // 2, groups=c).flatten(2).transpose(1, 2)
        seq = F.conv1d(F.pad(x.transpose(1, 2), (self.filter_size - 1, 0)), weight, groups=c)  # causal
        return seq.transpose(1, 2)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = h.shape
        if grid[0] * grid[1] != t:
            raise ValueError(f"gated_conv: grid {grid[0]}x{grid[1]} does not hold {t} tokens")
        u = self.qkv(h)
        if self.featurizer is not None:
            u = self._filter(u, self.featurizer, grid)
        q, k, v = u.chunk(3, dim=-1)
        y = q * self._filter(k * v, self.inner_filter, grid)
        return self.proj(y)

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """in_proj + proj 4 T D^2; short filters T (3D + D) k_eff (k^2 in 2-D, k in 1-D); gates not counted."""
        t, d = num_tokens, self.dim
        taps = self.filter_size ** 2 if self.layout == "2d" else self.filter_size
        channels = d + (3 * d if self.featurizer is not None else 0)
        return breakdown(projections=4 * t * d * d, products=t * channels * taps)
