"""Multi-head softmax self-attention (Vaswani et al., 2017) with the original DiT's fused `qkv`.

Backends: `sdpa` (torch's fused scaled-dot-product kernels, the default), `xformers`
(`memory_efficient_attention`, CUDA only, optional dependency), `math` (explicit
softmax(QK^T/sqrt(d))V, the reference in tests) and `auto` (xformers on CUDA when installed,
SDPA otherwise). Asking for xformers where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp, breakdown

BACKENDS = ("auto", "sdpa", "xformers", "math")


XFORMERS_FIX = ("Fix: install the xformers wheel built for this torch (`pip install -U xformers --index-url "
                 "https://download.pytorch.org/whl/cuXXX` with your CUDA version, or pin torch to the version the "
                 "xformers release names), or use --attention-backend sdpa")


def xformers_available() -> bool:
    """xformers is installed and its kernels load (on CUDA: run) here (checked once per process)."""
    return xformers_problem() is None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0][:160] if lines else ""


@functools.lru_cache(maxsize=None)
def xformers_problem() -> str | None:
    """None when xformers imports and (on a CUDA machine) runs a tiny attention; else ONE line saying why.

    A wheel built for another torch/CUDA prints pages of warnings at import and fails at the first call
    ("xFormers wasn't built with CUDA support"); both are captured here and summarised."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (`pip install -e .[xformers]` on a CUDA machine)"
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    xlog = logging.getLogger("xformers")
    xlog.addHandler(handler)
    propagate, xlog.propagate = xlog.propagate, False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(log), \
                contextlib.redirect_stdout(log):
            warnings.simplefilter("always")
            try:
                import xformers
                import xformers.ops as xops
            except Exception as err:  # noqa: BLE001 - summarised in one line
                return f"xformers cannot be imported ({type(err).__name__}: {_first_line(err)})"
            built = re.search(r"built for:?\s*(.*?)(?:\(you have|$)", log.getvalue() + " ".join(
                str(w.message) for w in caught), flags=re.S)
            built_for = f", built for {' '.join(built.group(1).split())[:80]}" if built else ""
            if torch.cuda.is_available():
                try:
                    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
                    xops.memory_efficient_attention(q, q, q)
                except Exception as err:  # noqa: BLE001
                    return (f"xformers {getattr(xformers, '__version__', '?')}{built_for} cannot run with torch "
                            f"{torch.__version__} ({type(err).__name__}: {_first_line(err)})")
    finally:
        xlog.removeHandler(handler)
        xlog.propagate = propagate
    return None


def check_backend(backend: str) -> None:
    """Raise a clear error for an unknown backend or an xformers request that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}. Valid backends: {', '.join(BACKENDS)}")
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' requested but xformers is not installed: "
                             "`pip install -e .[xformers]` on a CUDA machine, or use --attention-backend sdpa")
        problem = xformers_problem()
        if problem is not None:
            raise ValueError(f"attention backend 'xformers' unavailable: {problem}. {XFORMERS_FIX}")
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

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """qkv and proj 4 T D^2; QK^T and AV T^2 D each, one multiply-add per product (the DiT paper's count)."""
        t, d = num_tokens, self.proj.in_features
        return breakdown(projections=4 * t * d * d, products=2 * t * t * d)
