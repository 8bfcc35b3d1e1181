"""Sliding-window (local, neighbourhood) attention on the token grid.

Each query attends to the k x k neighbourhood centred on it on the 2-D token grid (clipped at the
borders: keys outside the grid do not exist), softmax(q K_nb^T / sqrt(d)) V_nb per head, then `proj`.
This is the 2-D form of the grafting paper's SWA operator (Chandrasegaran et al. 2025, "Exploring
Diffusion Transformer Designs via Grafting": flash-attn window (4, 4) in raster order; on an image grid a
square neighbourhood is the natural local window, as in Neighborhood Attention, Hassani et al. 2023).

Keys `qkv` (D -> 3D) and `proj` (D -> D) are those of DiT's softmax attention, so a trained block's
attention weights fit by shape (grafting starts from them).

Execution, never a T x T Python loop:
- `sdpa` / `xformers` / `auto`: queries are cut into b x b tiles (option `tile`, default 8), each tile's
  keys are its (b + k - 1)^2 halo, gathered for all tiles at once with `F.unfold`; one batched attention
  call over (N * heads * tiles) with a cached additive mask (neighbourhood and grid border). On grids whose
  token count is at most one halo, one dense attention with a cached (T, T) neighbourhood mask.
- `math`: the reference: every query's k^2 neighbours gathered with `F.unfold`, q K_nb^T and A V_nb as
  explicit batched matmuls (what the FLOPs formula counts).

Cost (DiT paper convention, multiply-adds per sample): qkv + proj 4 T D^2, products 2 T k^2 D (each query
against its k^2 neighbourhood slots; border slots are masked, still counted, as neighbourhood-attention
kernels compute them). The tiled path spends (b + k - 1)^2 / k^2 times the product MACs for regular memory
access; at 4096 tokens that is still ~30x fewer than full attention's 2 T^2 D with k = 5.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp, breakdown
from .constants import geometry_constant
from .softmax import check_backend, scaled_dot_product


def _neighbourhood_ok(qy: torch.Tensor, qx: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, radius: int,
                      grid: tuple[int, int]) -> torch.Tensor:
    """Boolean: key (ky, kx) exists on the grid and lies in the (2r+1)^2 neighbourhood of query (qy, qx)."""
    inside = (ky >= 0) & (ky < grid[0]) & (kx >= 0) & (kx < grid[1])
    return inside & ((qy - ky).abs() <= radius) & ((qx - kx).abs() <= radius)


@register_attention("window")
class SlidingWindowAttention(AttentionOp):
    """k x k neighbourhood attention on the token grid (see the module doc).

    Options: `window_size` (odd k, default 5), `tile` (query tile side of the fused path, default 8),
    `qkv_bias` (True), `backend` (sdpa | math | xformers | auto).
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", window_size: int = 5, tile: int = 8,
                 qkv_bias: bool = True, **_: Any):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        window_size, tile = int(window_size), int(tile)
        if window_size < 1 or window_size % 2 == 0:
            raise ValueError(f"window attention: window_size must be a positive odd number (3, 5, 7, ...), "
                             f"got {window_size}; set attention_options={{'window_size': 5}}")
        if tile < 1:
            raise ValueError(f"window attention: tile must be >= 1, got {tile}")
        check_backend(backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.tile = tile
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @property
    def radius(self) -> int:
        return self.window_size // 2

    # ------------------------------------------------------------------ masks (cached per grid)
    def dense_mask(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(T, T) additive mask: 0 inside each query's neighbourhood, -inf elsewhere."""
        def build() -> torch.Tensor:
            ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
            ys, xs = ys.reshape(-1), xs.reshape(-1)
            ok = _neighbourhood_ok(ys[:, None], xs[:, None], ys[None, :], xs[None, :], self.radius, grid)
            return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf")).to(device)

        return geometry_constant(("window-dense", tuple(grid), self.window_size, str(device), dtype), build)

    def tile_mask(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(tiles, b^2, (b + 2r)^2) additive mask of the tiled path (padding queries see every key)."""
        def build() -> torch.Tensor:
            b, r = self.tile, self.radius
            ty, tx = -(-grid[0] // b), -(-grid[1] // b)
            qi, qj = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
            ku, kv = torch.meshgrid(torch.arange(b + 2 * r), torch.arange(b + 2 * r), indexing="ij")
            oy, ox = torch.meshgrid(torch.arange(ty) * b, torch.arange(tx) * b, indexing="ij")
            oy, ox = oy.reshape(-1, 1, 1), ox.reshape(-1, 1, 1)
            qy, qx = oy + qi.reshape(1, -1, 1), ox + qj.reshape(1, -1, 1)            # (tiles, b^2, 1)
            ky, kx = oy + ku.reshape(1, 1, -1) - r, ox + kv.reshape(1, 1, -1) - r    # (tiles, 1, (b+2r)^2)
            ok = _neighbourhood_ok(qy, qx, ky, kx, r, grid)
            padded_query = (qy >= grid[0]) | (qx >= grid[1])
            ok = ok | padded_query
            return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf")).to(device)

        key = ("window-tile", tuple(grid), self.tile, self.window_size, str(device), dtype)
        return geometry_constant(key, build)

    def prepare(self, grid: tuple[int, int], device: torch.device, batch: int | None = None,
                dtype: torch.dtype | None = None) -> None:
        """Build the mask `forward` will use for this grid and activation dtype, eagerly (`DiT.forward`)."""
        grid = (int(grid[0]), int(grid[1]))
        if dtype is None or self.backend == "math":
            return  # the gathered path's mask is built on its first call
        if grid[0] * grid[1] <= (self.tile + 2 * self.radius) ** 2:
            self.dense_mask(grid, device, dtype)
        else:
            self.tile_mask(grid, device, dtype)

    # ------------------------------------------------------------------ the three execution paths
    def _gathered(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Reference: each query against its k^2 gathered neighbours, explicit matmuls. (N, H, T, d) in/out."""
        n, heads, t, dh = q.shape
        ks, r = self.window_size, self.radius

        def neighbours(x: torch.Tensor) -> torch.Tensor:   # (N, H, T, d) -> (N, H, T, k^2, d), zero-padded
            img = x.reshape(n * heads, grid[0], grid[1], dh).permute(0, 3, 1, 2)
            cols = F.unfold(img, ks, padding=r)              # (N H, d k^2, T)
            return cols.reshape(n, heads, dh, ks * ks, t).permute(0, 1, 4, 3, 2)

        def build() -> torch.Tensor:
            ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
            du, dv = torch.meshgrid(torch.arange(ks) - r, torch.arange(ks) - r, indexing="ij")
            ky, kx = ys.reshape(-1, 1) + du.reshape(1, -1), xs.reshape(-1, 1) + dv.reshape(1, -1)
            ok = (ky >= 0) & (ky < grid[0]) & (kx >= 0) & (kx < grid[1])
            return torch.zeros(ok.shape, dtype=q.dtype).masked_fill(~ok, float("-inf")).to(q.device)

        key = ("window-gather", tuple(grid), self.window_size, str(q.device), q.dtype)
        mask = geometry_constant(key, build).unsqueeze(-2)     # (T, 1, k^2)
        scores = (q * dh ** -0.5).unsqueeze(-2) @ neighbours(k).transpose(-2, -1)   # (N, H, T, 1, k^2)
        attn = (scores + mask).softmax(dim=-1)
        return (attn @ neighbours(v)).squeeze(-2)

    def _tiled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Fused path: b x b query tiles against their halos in one batched attention. (N, H, T, d) in/out."""
        n, heads, t, dh = q.shape
        b, r = self.tile, self.radius
        gh, gw = grid
        ty, tx = -(-gh // b), -(-gw // b)
        ph, pw = ty * b - gh, tx * b - gw
        m = n * heads

        def image(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(m, gh, gw, dh).permute(0, 3, 1, 2)           # (M, d, gh, gw)

        qi = F.pad(image(q), (0, pw, 0, ph))                                # (M, d, ty b, tx b)
        qi = qi.reshape(m, dh, ty, b, tx, b).permute(0, 2, 4, 3, 5, 1).reshape(m, ty * tx, b * b, dh)

        def halo(x: torch.Tensor) -> torch.Tensor:
            padded = F.pad(image(x), (r, r + pw, r, r + ph))
            cols = F.unfold(padded, b + 2 * r, stride=b)                    # (M, d (b+2r)^2, tiles)
            return cols.reshape(m, dh, (b + 2 * r) ** 2, ty * tx).permute(0, 3, 2, 1)

        mask = self.tile_mask(grid, q.device, q.dtype)                      # (tiles, b^2, (b+2r)^2)
        out = scaled_dot_product(qi, halo(k), halo(v), self.backend, mask)  # (M, tiles, b^2, d)
        out = out.reshape(m, ty, tx, b, b, dh).permute(0, 1, 3, 2, 4, 5).reshape(m, ty * b, tx * b, dh)
        return out[:, :gh, :gw].reshape(n, heads, t, dh)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = h.shape
        grid = (int(grid[0]), int(grid[1]))
        if grid[0] * grid[1] != t:
            raise ValueError(f"window attention: grid {grid[0]}x{grid[1]} does not hold {t} tokens")
        q, k, v = self.qkv(h).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.backend == "math":
            out = self._gathered(q, k, v, grid)
        elif t <= (self.tile + 2 * self.radius) ** 2:
            out = scaled_dot_product(q, k, v, self.backend, self.dense_mask(grid, h.device, q.dtype))
        else:
            out = self._tiled(q, k, v, grid)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """qkv, proj 4 T D^2; q K_nb^T and A V_nb 2 T k^2 D (k^2 neighbourhood slots per query)."""
        t, d = num_tokens, self.proj.in_features
        return breakdown(projections=4 * t * d * d, products=2 * t * self.window_size ** 2 * d)
