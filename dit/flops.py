"""FLOPs of DiT models and attention operators in the DiT paper's convention.

Convention (Peebles & Xie 2023, Table 4 "Gflops"; wpeebles in DiT issue #14): "flops" are
multiply-accumulates (one per fused multiply-add) of one conditional forward of ONE sample. Every
matmul counts its MACs: a Linear on T tokens T * in * out, the attention products Q K^T and A V
T * T * D each, i.e. 2 T^2 D per softmax attention (the "2N^2 D" of PT-DiT Eq. 3). Biases,
normalisations, softmax, activations, means, masks and element-wise products are not counted;
per-sample conditioning Linears (adaLN, timestep MLP) count once per sample.

This reproduces the paper at 256 px (32x32 latents): DiT-S/2 6.06, B/2 23.01, L/2 80.71,
XL/2 118.64 Gflops (tests/test_flops.py). Note: the reference notes' phrase "attention products
counted at twice their MACs" does not reproduce these numbers (it gives S/2 6.66, XL/2 122.9); the
products enter exactly once at their MACs, 2 T^2 D per block, and that is what is implemented here.

Per variant (one block's attention, T tokens, width D):
- softmax: 4 T D^2 (qkv, proj) + 2 T^2 D.
- linear (LiT): 4 T D^2 + 2 T D (d_h + 1) (phi(K)^T [V|1] and phi(Q) (...); the +1 is the normaliser
  sum phi(K), computed by the same matmul) + k^2 T D (depthwise k x k conv, k = 5).
- proxy (PT-DiT), window area p, M = T / p proxies: projections 4 M D^2 (proxy SA) + T D^2 + 2 M D^2
  + T D^2 (cross-attention q, kv, zero out) + 4 T D^2 (WSA) + 4 T D^2 (SWSA) + 3 D^2 (SWSA modulation);
  products 2 M^2 D + 2 T M D + 2 T p D + 2 T p D = 2 (1/p^2 + 1/p + 2p/T) T^2 D (PT-DiT Eq. 3-4).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import torch

__all__ = ["attention_flops", "model_flops", "format_flops"]

# Operators with closed-form counts here; any other registered operator is asked for `op.flops(T)`.
_FORMULA_VARIANTS = ("softmax", "linear", "proxy")


def _square_grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(int(tokens))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid; pass grid=(H, W)")
    return side, side


def attention_flops(name: str, dim: int, heads: int, tokens: int, grid: tuple[int, int] | None = None,
                    breakdown: bool = False, **opts: Any) -> float | dict[str, float]:
    """Multiply-adds of one block's attention operator for one sample (DiT paper convention).

    `opts` are the operator's options (`linear_heads`, `dwc_kernel`, `window`, `shift`, ...; others are
    ignored). With `breakdown=True` returns {"projections", "products", "other", "conditioning", "total"}
    where "products" are the attention matmuls only (the part PT-DiT's Eq. 3-4 and LiT's O(N) claim are about).
    """
    t, d = int(tokens), int(dim)
    proj = prod = other = cond = 0.0
    if name == "softmax":
        proj = 4 * t * d * d
        prod = 2 * t * t * d
    elif name == "linear":
        lh = int(opts.get("linear_heads", 2))
        if d % lh:
            raise ValueError(f"hidden size {d} is not divisible by linear_heads {lh}")
        k = int(opts.get("dwc_kernel", 5))
        proj = 4 * t * d * d
        prod = 2 * t * d * (d // lh + 1)
        other = k * k * t * d
    elif name == "proxy":
        from .attention.proxy import parse_window, resolve_window

        grid = tuple(grid) if grid is not None else _square_grid(t)
        if grid[0] * grid[1] != t:
            raise ValueError(f"grid {grid} does not hold {t} tokens")
        wh, ww = resolve_window(grid, parse_window(opts.get("window")))
        p = wh * ww
        m = t // p
        shift = bool(opts.get("shift", True))
        proj = 4 * m * d * d + t * d * d + 2 * m * d * d + t * d * d + 4 * t * d * d
        prod = 2 * m * m * d + 2 * t * m * d + 2 * t * p * d
        if shift:
            proj += 4 * t * d * d
            prod += 2 * t * p * d
            cond = 3 * d * d
    else:
        from .attention import ATTENTION_REGISTRY, build_attention

        if name not in ATTENTION_REGISTRY:
            build_attention(name, dim, heads)  # raises the registry's "Unknown attention variant" error
        options = {k: v for k, v in opts.items()}
        options.setdefault("backend", "sdpa")
        with torch.device("meta"):
            op = build_attention(name, dim, heads, **options)
        total = float(op.flops(t))
        return {"projections": 0.0, "products": 0.0, "other": total, "conditioning": 0.0, "total": total} \
            if breakdown else total
    total = float(proj + prod + other + cond)
    if breakdown:
        return {"projections": float(proj), "products": float(prod), "other": float(other),
                "conditioning": float(cond), "total": total}
    return total


def _mlp_flops(mlp_type: str, dim: int, mlp_ratio: float, tokens: int) -> float:
    if mlp_type == "mlp":
        return float(2 * tokens * dim * int(dim * mlp_ratio))
    from .mlp import build_mlp

    with torch.device("meta"):
        return float(build_mlp(mlp_type, dim, mlp_ratio).flops(tokens))


def _resolve_config(model_or_config: Any) -> tuple[dict[str, Any], Any]:
    from .config import model_kwargs
    from .model import DiT

    model = None
    if isinstance(model_or_config, str):
        given: Mapping[str, Any] = model_kwargs(model_or_config)
    elif isinstance(model_or_config, DiT):
        model = model_or_config
        given = dict(model.config)
    elif isinstance(model_or_config, Mapping):
        given = model_or_config
    else:
        raise TypeError("model_flops takes a DiT, a config dict or a preset name such as 'DiT-S/2', "
                        f"not {type(model_or_config).__name__}")
    defaults = {k: p.default for k, p in inspect.signature(DiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    cfg = {**defaults, **{k: v for k, v in given.items() if not str(k).startswith("_")}}
    return cfg, model


def model_flops(model_or_config: Any, input_size: int | tuple[int, int] | None = None,
                tokens: int | None = None, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per-block and total multiply-adds of one conditional forward of one sample (DiT paper convention).

    `model_or_config`: a `DiT`, a config dict (DiT keyword arguments) or a preset name ("DiT-XL/2").
    The size is `grid` (H, W) tokens, or `tokens` (a square count), or `input_size` (model input pixels,
    latent pixels for latent models: 32 = 256 px images), default the config's `input_size`.
    Returns {"grid", "tokens", "blocks": [{"attention", "attention_flops", "attention_products",
    "mlp_flops", "adaln_flops", "total"}], "embed", "final", "total", "gflops"}.
    Dynamic (DyDiT) configurations are counted at full width (the static upper bound).
    """
    from .model import block_attention_list

    cfg, _ = _resolve_config(model_or_config)
    p, d, heads, depth = int(cfg["patch_size"]), int(cfg["hidden_size"]), int(cfg["num_heads"]), int(cfg["depth"])
    if grid is not None:
        grid = (int(grid[0]), int(grid[1]))
    elif tokens is not None:
        grid = _square_grid(int(tokens))
    else:
        size = cfg["input_size"] if input_size is None else input_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if hw[0] % p or hw[1] % p:
            raise ValueError(f"input size {hw[0]}x{hw[1]} is not divisible by the patch size {p}")
        grid = (hw[0] // p, hw[1] // p)
    t = grid[0] * grid[1]
    options = dict(cfg.get("attention_options") or {})
    options.setdefault("backend", cfg.get("attention_backend", "sdpa"))
    out_channels = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)

    blocks = []
    for name in block_attention_list(cfg["attention"], depth):
        attn = attention_flops(name, d, heads, t, grid=grid, breakdown=True, **options)
        mlp = _mlp_flops(cfg.get("mlp_type", "mlp"), d, float(cfg["mlp_ratio"]), t)
        adaln = float(6 * d * d)
        blocks.append({"attention": name, "attention_flops": attn["total"], "attention_products": attn["products"],
                       "mlp_flops": mlp, "adaln_flops": adaln, "total": attn["total"] + mlp + adaln})
    embed = float(t * p * p * cfg["in_channels"] * d + 256 * d + d * d)   # patch conv + timestep MLP
    final = float(2 * d * d + t * d * p * p * out_channels)               # final adaLN + linear
    total = embed + final + sum(b["total"] for b in blocks)
    return {"grid": grid, "tokens": t, "blocks": blocks, "embed": embed, "final": final,
            "total": total, "gflops": total / 1e9}


def format_flops(value: float) -> str:
    """'6.06 G' style string."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"
