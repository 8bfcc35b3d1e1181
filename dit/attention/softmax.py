"""Multi-head softmax self-attention (Vaswani et al., 2017) with the original DiT's fused `qkv`.

Backends: `sdpa` (torch's fused scaled-dot-product kernels, the default), `xformers`
(`memory_efficient_attention`, CUDA only, optional dependency), `math` (explicit
softmax(QK^T/sqrt(d))V, the reference in tests) and `auto` (xformers on CUDA when installed,
SDPA otherwise). Asking for xformers where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp

BACKENDS = ("auto", "sdpa", "xformers", "math")


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def check_backend(backend: str) -> None:
    """Raise a clear error for an unknown backend or an xformers request that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}. Valid backends: {', '.join(BACKENDS)}")
    if backend == "xformers":
        if not xformers_available():
            raise ValueError("attention backend 'xformers' requested but xformers is not installed: "
                             "`pip install -e .[xformers]` on a CUDA machine, or use --attention-backend sdpa")
        if not torch.cuda.is_available():
            raise ValueError("attention backend 'xformers' needs a CUDA GPU (its kernels are GPU-only); "
                             "use --attention-backend sdpa on this machine")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v on (N, heads, T, d) tensors, in the input dtype."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn + mask
    return attn.softmax(dim=-1) @ v


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on (N, heads, T, d) tensors with the chosen backend (mask: additive, broadcastable)."""
    if backend == "auto":
        backend = "xformers" if (q.is_cuda and mask is None and xformers_available()) else "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return math_attention(q, k, v, mask)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("attention backend 'xformers' runs on CUDA tensors only; move the model to a GPU "
                             "(--device cuda) or use --attention-backend sdpa")
        import xformers.ops as xops  # optional dependency

        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias)
        return out.transpose(1, 2)
    raise ValueError(f"Unknown attention backend {backend!r}. Valid backends: {', '.join(BACKENDS)}")


@register_attention("softmax")
class SoftmaxAttention(AttentionOp):
    """DiT's attention: fused qkv projection (keys `qkv`, `proj`, as timm's `Attention`)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", qkv_bias: bool = True, **_: object):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        check_backend(backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = h.shape
        qkv = self.qkv(h).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = h.shape
        q, k, v = self.split_heads(h)
        out = scaled_dot_product(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))

    def flops(self, num_tokens: int) -> float:
        d = self.proj.in_features
        projections = 4 * num_tokens * d * d
        products = 2 * num_tokens * num_tokens * d  # QK^T and AV, one multiply-add each (the DiT paper's count)
        return float(projections + products)
