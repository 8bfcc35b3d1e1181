"""FLOPs of DiT models and attention operators in the DiT paper's convention, summed from what operators report.

Convention (Peebles & Xie 2023, Table 4 "Gflops"; wpeebles in DiT issue #14): "flops" are
multiply-accumulates (one per fused multiply-add) of one conditional forward of ONE sample. Every
matmul counts its MACs: a Linear on T tokens T * in * out, the attention products Q K^T and A V
T * T * D each, i.e. 2 T^2 D per softmax attention (the "2N^2 D" of PT-DiT Eq. 3). Biases,
normalisations, softmax, activations, means, masks and element-wise products are not counted;
per-sample conditioning Linears (adaLN, timestep MLP) count once per sample.

Every operator owns its cost: attention operators implement `flops_breakdown(T, grid)` (see
`dit.attention.base.AttentionOp`), MLP operators `flops(T, grid)`, blocks `flops(grid)` (the sum of
their operators plus adaLN). This module only builds what it is asked about (on the meta device, no
memory) and adds up those reports, plus the patch / timestep embedders and the final layer; a new
registered operator is counted with nothing added here.

This reproduces the paper at 256 px (32x32 latents): DiT-S/2 6.06, B/2 23.01, L/2 80.71,
XL/2 118.64 Gflops (tests/test_flops.py). Note: the reference notes' phrase "attention products
counted at twice their MACs" does not reproduce these numbers (it gives S/2 6.66, XL/2 122.9); the
products enter exactly once at their MACs, 2 T^2 D per block, and that is what is implemented here.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from .attention import ATTENTION_REGISTRY, build_attention
from .attention.base import square_grid
from .model import DiT

__all__ = ["attention_flops", "model_flops", "format_flops"]


def attention_flops(name: str, dim: int, heads: int, tokens: int, grid: tuple[int, int] | None = None,
                    breakdown: bool = False, **opts: Any) -> float | dict[str, float]:
    """Multiply-adds of one block's attention operator for one sample (DiT paper convention).

    `opts` are the operator's options (`linear_heads`, `dwc_kernel`, `window`, `shift`, ...; others are
    ignored). With `breakdown=True` returns {"projections", "products", "other", "conditioning", "total"}
    where "products" are the attention matmuls only (the part PT-DiT's Eq. 3-4 and LiT's O(N) claim are about).
    The numbers are the operator's own (`op.flops_breakdown`), built on the meta device.
    """
    if name not in ATTENTION_REGISTRY:
        build_attention(name, dim, heads)  # raises the registry's "Unknown attention variant" error
    options = dict(opts)
    options.setdefault("backend", "sdpa")
    t = int(tokens)
    grid = tuple(grid) if grid is not None else None
    with torch.device("meta"):
        op = build_attention(name, int(dim), int(heads), **options)
    parts = {k: float(v) for k, v in op.flops_breakdown(t, grid).items()}
    return parts if breakdown else parts["total"]


def _config_of(model_or_config: Any) -> dict[str, Any]:
    from .config import model_kwargs

    if isinstance(model_or_config, str):
        given: Mapping[str, Any] = model_kwargs(model_or_config)
    elif isinstance(model_or_config, Mapping):
        given = model_or_config
    else:
        raise TypeError("model_flops takes a DiT, a config dict or a preset name such as 'DiT-S/2', "
                        f"not {type(model_or_config).__name__}")
    defaults = {k: p.default for k, p in inspect.signature(DiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in given.items() if not str(k).startswith("_")}}


def _meta_model(cfg: dict[str, Any]) -> DiT:
    """The model of a config, on the meta device (no memory, no weights): only its structure is asked."""
    with torch.device("meta"):
        return DiT(**cfg)


def model_flops(model_or_config: Any, input_size: int | tuple[int, int] | None = None,
                tokens: int | None = None, grid: tuple[int, int] | None = None) -> dict[str, Any]:
    """Per-block and total multiply-adds of one conditional forward of one sample (DiT paper convention).

    `model_or_config`: a `DiT`, a config dict (DiT keyword arguments) or a preset name ("DiT-XL/2").
    The size is `grid` (H, W) tokens, or `tokens` (a square count), or `input_size` (model input pixels,
    latent pixels for latent models: 32 = 256 px images), default the config's `input_size`.
    Returns {"grid", "tokens", "blocks": [{"attention", "attention_flops", "attention_products",
    "mlp_flops", "adaln_flops", "total"}], "embed", "final", "total", "gflops"}.
    Dynamic (DyDiT) configurations are counted at full width (the static upper bound); parallel
    (restructured) blocks count every branch.
    """
    model = model_or_config if isinstance(model_or_config, DiT) else _meta_model(_config_of(model_or_config))
    cfg = model.config
    p, d = int(cfg.patch_size), int(cfg.hidden_size)
    if grid is not None:
        grid = (int(grid[0]), int(grid[1]))
    elif tokens is not None:
        grid = square_grid(int(tokens))
    else:
        size = cfg.input_size if input_size is None else input_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if hw[0] % p or hw[1] % p:
            raise ValueError(f"input size {hw[0]}x{hw[1]} is not divisible by the patch size {p}")
        grid = (hw[0] // p, hw[1] // p)
    t = grid[0] * grid[1]
    blocks = [{"attention": block.attention_name, **block.flops(grid)} for block in model.blocks]
    t_mlp = model.t_embedder.mlp
    embed = float(t * p * p * cfg.in_channels * d                                   # patch conv
                  + t_mlp[0].in_features * t_mlp[0].out_features + t_mlp[2].in_features * t_mlp[2].out_features)
    fl = model.final_layer
    final = float(fl.adaLN_modulation[-1].in_features * fl.adaLN_modulation[-1].out_features
                  + t * fl.linear.in_features * fl.linear.out_features)
    total = embed + final + sum(b["total"] for b in blocks)
    return {"grid": grid, "tokens": t, "blocks": blocks, "embed": embed, "final": final,
            "total": total, "gflops": total / 1e9}


def format_flops(value: float) -> str:
    """'6.06 G' style string."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"
