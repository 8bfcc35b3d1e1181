"""PT-DiT proxy-token attention (Wang et al., "Qihoo-T2X: An Efficient Proxy-Tokenized Diffusion
Transformer", arXiv 2409.04005v2, §3.2; released code in Ascend/MindSpeed-MM `pt_dit_diffusers.py`),
ported to the class-conditional adaLN-Zero DiT block.

One block (paper Eq. 1-2, the code's `ProxyTokensTransformerBlock.forward` order):

1. `pre_attention` - Global Information Interaction Module (GIIM), no adaLN, no gate:
   - proxy tokens P (N, M, D) = mean of each non-overlapping window (M = number of windows);
   - proxy self-attention       P <- P + SA(LN(P));
   - visual cross-attention     x <- x + ZeroLinear(CA(q = LN(x), kv = LN(P))).
     The zero-initialised Linear is the cross-attention's output projection (key `cross_out`): the
     reference stacks an ordinary `to_out` and a zero Linear, two linear maps in a row that one map
     expresses, so the studio keeps one and saves T*D^2 multiply-adds.
2. the main call `op(h, grid)` - window self-attention (WSA) on the block's adaLN-modulated tokens;
   the block applies its own gate_msa. Keys `qkv` and `proj` as softmax attention, so a softmax DiT's
   attention weights fit this branch.
3. `post_attention` - shifted-window self-attention (SWSA, Swin): roll by -window//2, window attention
   with the additive region mask, roll back, with its OWN adaLN modulation and a zero-initialised
   output projection:  x <- x + gate_sw * ZeroLinear(SWSA(LN(x) * (1 + scale_sw) + shift_sw)).
   (shift_sw, scale_sw, gate_sw) = `shift_table` (3, D) + Linear(SiLU(c)) (`shift_modulation`, (D -> 3D)).
   The table is a learned (3, D) parameter initialised randn / sqrt(D) as the reference's
   `proxy_scale_shift_table`; the Linear on c is zero-initialised, so at init the modulation is the
   table alone and becomes class- and time-dependent as it trains (the reference adds its table to the
   global adaLN-single t-projection, which this DiT does not have). Why not zero both: with gate = 0 and
   a zero output projection every gradient of the branch is zero and it never trains.
   WSA and SWSA run in every block (the paper's "not alternating", unlike Swin).

Windows: option `window` (h, w) (an int means square). Default: per side, the divisor of the grid side
that gives the window count closest to 8 (ties: smaller window), i.e. grid/8 when 8 divides the side:
64 proxies - (2, 2) at 16x16 tokens, (4, 4) at 32x32, (8, 8) at 64x64 (paper §3.2.3) - and window 1
for sides below 8 (4x4 grid: 16 single-token windows; the block is then softmax-free locally: WSA over
one token is proj(v), the shift is 0 so SWSA is also per token, and the proxies are the tokens).
A grid that the chosen window does not divide is an error naming the valid windows.

Grid equal to one window (`window == grid`), documented and tested:
- one proxy = the global mean; proxy SA over one token is proj(v(LN(P))); the cross-attention gives every
  token the same vector (softmax over one key), a global, position-independent bias;
- WSA is full softmax attention over the grid (equals `softmax` with the same qkv/proj);
- SWSA rolls by -(h//2, w//2) and the region mask splits the single window into the four quadrants of
  the ORIGINAL grid ([0, h//2) and [h//2, h) per side, wrap-around never mixes): SWSA is attention
  within each quadrant. (Swin instead disables the shift when the grid fits one window; PT-DiT's code
  always shifts and masks; the studio keeps PT-DiT's behaviour.)

Fixes of the reference code's quirks (reference notes A.6): conditioning is applied in (N, T, D)
layout before windows are formed, so per-sample modulation can never be tiled in the wrong batch /
window order (the original `repeat(window_number)` bug); the shift mask is cached per (grid, window,
device, dtype), never once for all inputs; proxies are contiguous window means.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp, BlockContext, breakdown, square_grid
from .constants import geometry_constant
from .softmax import check_backend, scaled_dot_product

WINDOWS_PER_SIDE = 8  # PT-DiT keeps 8x8 = 64 proxies at every resolution


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_window(grid: tuple[int, int]) -> tuple[int, int]:
    """PT-DiT's window rule: per side, the divisor giving the window count nearest 8 (ties: smaller window)."""
    return tuple(min(_divisors(side), key=lambda d: (abs(side // d - WINDOWS_PER_SIDE), d)) for side in grid)


def parse_window(window: int | Sequence[int] | None) -> tuple[int, int] | None:
    if window is None:
        return None
    if isinstance(window, int):
        window = (window, window)
    window = tuple(int(w) for w in window)
    if len(window) != 2 or min(window) < 1:
        raise ValueError(f"proxy attention: window must be an int or (h, w) of positive ints, got {window!r}")
    return window


def resolve_window(grid: tuple[int, int], window: tuple[int, int] | None) -> tuple[int, int]:
    """The window for `grid` (explicit or the default rule), checked to divide the grid."""
    win = default_window(grid) if window is None else window
    gh, gw = grid
    if gh % win[0] or gw % win[1]:
        raise ValueError(
            f"proxy attention: the token grid {gh}x{gw} is not divisible by the window {win[0]}x{win[1]}. "
            f"Valid window heights for this grid: {_divisors(gh)}; valid widths: {_divisors(gw)}. "
            "Set attention_options={'window': [h, w]} with such values, omit it for the default "
            "(grid/8 per side), or change the input size.")
    return win


def window_partition(x: torch.Tensor, grid: tuple[int, int], win: tuple[int, int]) -> torch.Tensor:
    """(N, T, C) row-major tokens -> (N * windows, wh * ww, C); windows are row-major, batch-major."""
    n, _, c = x.shape
    gh, gw = grid
    wh, ww = win
    x = x.reshape(n, gh // wh, wh, gw // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * (gh // wh) * (gw // ww), wh * ww, c)


def window_merge(x: torch.Tensor, n: int, grid: tuple[int, int], win: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (N * windows, wh * ww, C) -> (N, T, C)."""
    gh, gw = grid
    wh, ww = win
    c = x.shape[-1]
    x = x.reshape(n, gh // wh, gw // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * gw, c)


def shift_region_mask(grid: tuple[int, int], win: tuple[int, int]) -> torch.Tensor | None:
    """Swin's region mask for the rolled grid: (windows, p, p) additive float32 (0 or -inf); None if no shift."""
    gh, gw = grid
    wh, ww = win
    sh, sw = wh // 2, ww // 2
    if sh == 0 and sw == 0:
        return None
    ids = torch.zeros(gh, gw)
    region = 0
    h_slices = [(0, gh - wh), (gh - wh, gh - sh), (gh - sh, gh)] if sh else [(0, gh)]
    w_slices = [(0, gw - ww), (gw - ww, gw - sw), (gw - sw, gw)] if sw else [(0, gw)]
    for h0, h1 in h_slices:
        for w0, w1 in w_slices:
            ids[h0:h1, w0:w1] = region
            region += 1
    win_ids = window_partition(ids.reshape(1, gh * gw, 1), grid, win).squeeze(-1)  # (windows, p)
    mask = torch.zeros(win_ids.shape[0], win_ids.shape[1], win_ids.shape[1])
    return mask.masked_fill(win_ids[:, :, None] != win_ids[:, None, :], float("-inf"))


def _blocks(side: int, win: int, shift: int) -> list[tuple[int, int]]:
    """[start, end) spans of one grid side: windows of `win`, offset by `shift` (edges clipped, no wrap)."""
    if shift == 0:
        return [(i, i + win) for i in range(0, side, win)]
    return [(0, shift)] + [(i, i + win) for i in range(shift, side - win + shift, win)] + [(side - win + shift, side)]


def window_layout(grid: tuple[int, int], win: tuple[int, int], shifted: bool) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Token order and (window count, window size) groups for mask-free (shifted-)window attention.

    Unshifted: the windows in row-major order, one group. Shifted (Swin's roll by -window//2 + region mask):
    attention inside each region of a rolled window is attention inside the rectangles of the ORIGINAL grid
    cut at offsets (window//2 + k * window) per side, edges clipped, never wrapping; those rectangles have
    at most 3 x 3 different sizes (1 x 1 ... 2 x 2 for even windows). Tokens are ordered group by group,
    rectangle by rectangle, so that each group is one (N * count, size) batch for SDPA's flash /
    memory-efficient kernels: no masks, and no masked-out products computed.
    """
    gh, gw = grid
    wh, ww = win
    sh, sw = (wh // 2, ww // 2) if shifted else (0, 0)
    rects: dict[tuple[int, int], list[torch.Tensor]] = {}
    index = torch.arange(gh * gw).reshape(gh, gw)
    for r0, r1 in _blocks(gh, wh, sh):
        for c0, c1 in _blocks(gw, ww, sw):
            rects.setdefault((r1 - r0, c1 - c0), []).append(index[r0:r1, c0:c1].reshape(-1))
    order, groups = [], []
    for rh, cw in sorted(rects, reverse=True):  # sort the (h, w) keys only: traceable by torch.compile
        order += rects[(rh, cw)]
        groups.append((len(rects[(rh, cw)]), rh * cw))
    return torch.cat(order), groups


@register_attention("proxy")
class ProxyTokenAttention(AttentionOp):
    """PT-DiT proxy-token attention: GIIM (proxy SA + cross-attention) + WSA + SWSA, see the module doc.

    Options: `window` ((h, w) or int; default: grid/8 per side), `shift` (True: run SWSA),
    `qkv_bias` (True), `backend` (sdpa | math | xformers | auto for every softmax inside).
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", window: int | Sequence[int] | None = None,
                 shift: bool = True, qkv_bias: bool = True, **_: Any):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        check_backend(backend)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.window = parse_window(window)
        self.shift = bool(shift)
        # GIIM: proxy self-attention and all-tokens -> proxies cross-attention (zero-init output)
        self.proxy_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proxy_proj = nn.Linear(dim, dim)
        self.cross_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.cross_kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.cross_out = nn.Linear(dim, dim)
        # WSA (the main call; softmax-compatible keys)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # SWSA with its own modulation
        if self.shift:
            self.shift_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.shift_proj = nn.Linear(dim, dim)
            self.shift_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
            self.shift_table = nn.Parameter(torch.zeros(3, dim))
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """Zero-init the cross-attention and SWSA outputs and the SWSA modulation Linear (called by DiT's init)."""
        nn.init.zeros_(self.cross_out.weight)
        nn.init.zeros_(self.cross_out.bias)
        if self.shift:
            nn.init.zeros_(self.shift_proj.weight)
            nn.init.zeros_(self.shift_proj.bias)
            nn.init.zeros_(self.shift_modulation[-1].weight)
            nn.init.zeros_(self.shift_modulation[-1].bias)
            with torch.no_grad():
                self.shift_table.copy_(torch.randn(3, self.dim, device=self.shift_table.device) / math.sqrt(self.dim))

    # ------------------------------------------------------------------ helpers
    def window_for(self, grid: tuple[int, int]) -> tuple[int, int]:
        return resolve_window(tuple(grid), self.window)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, L, parts * D) -> `parts` tensors (B, heads, L, d_h)."""
        b, length, _ = x.shape
        x = x.reshape(b, length, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return x.unbind(0)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(b, length, self.dim)

    def window_order(self, grid: tuple[int, int], win: tuple[int, int], shifted: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Token permutation to window-group order (`window_layout`), its inverse and the groups, cached per
        (grid, window, shifted, device) for all blocks (`constants`): one gather replaces roll + partition."""
        def build() -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
            order, groups = window_layout(tuple(grid), tuple(win), shifted)
            return order.to(device), torch.argsort(order).to(device), groups

        return geometry_constant(("proxy-order", tuple(grid), tuple(win), shifted, str(device)), build)

    def _window_attention(self, h: torch.Tensor, qkv_layer: nn.Linear, out_layer: nn.Linear,
                          grid: tuple[int, int], win: tuple[int, int], shifted: bool) -> torch.Tensor:
        """out_layer(self-attention inside every (shifted) window), as ONE batched attention over (N * windows).

        h: (N, T, D) row-major tokens -> (N, T, D) row-major. The tokens are gathered into window-major
        order once (D channels, before the qkv projection, which is per token) and scattered back once.
        """
        n, t, d = h.shape
        order, inverse, groups = self.window_order(grid, win, shifted, h.device)
        qkv = qkv_layer(h.index_select(1, order))                 # (N, T, 3D), window-group order
        outs, start = [], 0
        for count, size in groups:  # one group unshifted; shifted: full, edge and corner windows, no masks
            part = qkv[:, start:start + count * size].reshape(n * count, size, 3, self.num_heads, self.head_dim)
            q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)        # (N * count, heads, size, d_h) views
            out = scaled_dot_product(q, k, v, self.backend)        # (N * count, heads, size, d_h)
            outs.append(out.transpose(1, 2).reshape(n, count * size, d))
            start += count * size
        out = out_layer(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        return out.index_select(1, inverse)

    def shift_mask(self, grid: tuple[int, int], win: tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor | None:
        """The region mask for this grid and window, cached per (grid, window, device, dtype)."""
        def build() -> torch.Tensor | None:
            mask = shift_region_mask(tuple(grid), tuple(win))
            return None if mask is None else mask.to(device=device, dtype=dtype)

        return geometry_constant(("proxy-mask", tuple(grid), tuple(win), str(device), dtype), build)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)

    def prepare(self, grid: tuple[int, int], device: torch.device, batch: int | None = None,
                dtype: torch.dtype | None = None) -> None:
        """Build this grid's token orders eagerly (called by `DiT.forward` before the blocks)."""
        win = self.window_for(tuple(grid))
        self.window_order(grid, win, False, device)
        if self.shift:
            self.window_order(grid, win, True, device)

    # ------------------------------------------------------------------ the three branches
    def proxy_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Window means, (N, M, D), windows in row-major order (paper v2 'averaging token')."""
        n, _, d = x.shape
        gh, gw = grid
        wh, ww = self.window_for(grid)
        return x.reshape(n, gh // wh, wh, gw // ww, ww, d).mean(dim=(2, 4)).reshape(n, -1, d)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """GIIM: P = mean windows; P = P + SA(LN(P)); x = x + ZeroLinear(CA(LN(x), LN(P)))."""
        grid = tuple(ctx.grid)
        p = self.proxy_tokens(x, grid)
        q, k, v = self._heads(self.proxy_qkv(self._norm(p)), 3)
        p = p + self.proxy_proj(self._merge(scaled_dot_product(q, k, v, self.backend)))
        q = self._heads(self.cross_q(self._norm(x)), 1)[0]
        k, v = self._heads(self.cross_kv(self._norm(p)), 2)
        return x + self.cross_out(self._merge(scaled_dot_product(q, k, v, self.backend)))

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """WSA on the block's adaLN-modulated tokens (N, T, D); the block gates and adds it."""
        grid = tuple(grid)
        if grid[0] * grid[1] != h.shape[1]:
            raise ValueError(f"proxy attention: grid {grid[0]}x{grid[1]} does not hold {h.shape[1]} tokens")
        win = self.window_for(grid)
        return self._window_attention(h, self.qkv, self.proj, grid, win, shifted=False)

    def post_attention(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """SWSA with own modulation: x + gate * ZeroLinear(unroll(WA_masked(roll(LN(x)(1+scale)+shift))))."""
        if not self.shift:
            return x
        grid = tuple(ctx.grid)
        win = self.window_for(grid)
        n, t, d = x.shape
        mod = self.shift_modulation(c) + self.shift_table.reshape(1, 3 * d).to(c.dtype)
        shift, scale, gate = mod.chunk(3, dim=1)                 # (N, D) each: per sample, never tiled
        h = torch.addcmul(shift.unsqueeze(1), self._norm(x), 1 + scale.unsqueeze(1))
        out = self._window_attention(h, self.shift_qkv, self.shift_proj, grid, win, shifted=True)
        return torch.addcmul(x, gate.unsqueeze(1), out)

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """Window area p, M = T / p proxies (PT-DiT Eq. 3-4): projections 4 M D^2 (proxy SA) + T D^2 + 2 M D^2
        + T D^2 (cross-attention q, kv, zero out) + 4 T D^2 (WSA) [+ 4 T D^2 (SWSA)]; products 2 M^2 D
        + 2 T M D + 2 T p D [+ SWSA] = 2 (1/p^2 + 1/p + 2p/T) T^2 D with Swin's masked SWSA (2 T p D); the
        mask-free SWSA here attends inside each shifted region only, 2 D sum(region sizes^2) <= 2 T p D
        (`window_layout`); SWSA modulation 3 D^2 (conditioning)."""
        t, d = int(num_tokens), self.dim
        grid = tuple(grid) if grid is not None else square_grid(t)
        if grid[0] * grid[1] != t:
            raise ValueError(f"grid {grid} does not hold {t} tokens")
        wh, ww = self.window_for(grid)
        p = wh * ww
        m = t // p
        proj = 4 * m * d * d + t * d * d + 2 * m * d * d + t * d * d + 4 * t * d * d
        prod = 2 * m * m * d + 2 * t * m * d + 2 * t * p * d
        cond = 0
        if self.shift:
            proj += 4 * t * d * d
            _, groups = window_layout(grid, (wh, ww), shifted=True)
            prod += 2 * d * sum(count * size * size for count, size in groups)
            cond = 3 * d * d
        return breakdown(projections=proj, products=prod, conditioning=cond)
