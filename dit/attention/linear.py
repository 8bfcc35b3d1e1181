"""LiT linear attention (Wang et al., "LiT: Delving into a Simple Linear Diffusion Transformer for
Image Generation", arXiv 2501.12976): ReLU-kernel linear attention plus a 5x5 depthwise convolution.

For each head, with phi = ReLU (LiT §3 / SLAB's simplified linear attention, Eq. "O = phi(Q)(phi(K)^T V)
/ (phi(Q) sum_j phi(K_j)^T + eps)"):

    O_i = phi(Q_i) (sum_j phi(K_j)^T V_j) / (phi(Q_i) sum_j phi(K_j)^T + eps)

then `O + DWC(V)` (depthwise 5x5 over the token grid, all D channels, groups = D, padding 2) and
the output projection `proj`. The products are evaluated right to left, phi(K)^T [V | 1] first,
so memory and time are O(T d_h D) and the T x T matrix is never formed; V is padded with a column
of ones so that one matmul yields numerator and denominator together (Sana's trick, diffusers'
`SanaLinearAttnProcessor2_0`).

Design choices (documented in the reference notes, section B):
- few heads: `linear_heads` (default 2, LiT's "free lunch" guideline 2) whatever the model's
  `num_heads`; the projections keep DiT's keys `qkv` (D -> 3D) and `proj` (D -> D), so a softmax DiT's
  weights fit by shape (`inherit_from_softmax`), plus `dwc`.
- the kernel, the sums and the DWC run in float32 with autocast disabled, whatever the input dtype:
  fp16 sums of phi(K)^T V overflow (65504) at a few thousand tokens, the known NaN failure of linear
  attention; the result is cast back to the input dtype before `proj`.
- eps (option `eps`, default 1e-6 as SLAB) keeps rows with phi(Q_i) . sum phi(K) = 0 finite (they
  output 0 + DWC(V)).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import register_attention
from .base import AttentionOp, breakdown


def linear_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """ReLU-kernel linear attention on (N, heads, T, d) tensors in float32, O(T) memory.

    Returns phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j)^T + eps), shape (N, heads, T, d), float32.
    """
    q = F.relu(q.float())
    k = F.relu(k.float())
    v = v.float()
    ones = torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)
    kv = k.transpose(-2, -1) @ torch.cat([v, ones], dim=-1)  # (N, heads, d, d + 1): [phi(K)^T V | sum phi(K)^T]
    out = q @ kv                                                 # (N, heads, T, d + 1)
    return out[..., :-1] / (out[..., -1:] + eps)


def linear_attention_kernel_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The same kernel for bf16 tensors (the CUDA path): the two products are bf16 tensor-core matmuls
    (fp32 accumulation inside), the normaliser phi(Q) sum_j phi(K_j)^T is summed and applied in fp32.

    bf16 has fp32's exponent range, so phi(K)^T V cannot overflow as in fp16 (which keeps the fp32 kernel);
    its 8-bit mantissa costs ~0.4% relative error per product, the normaliser stays exact to fp32.
    Returns (N, heads, T, d) in bf16.
    """
    q, k = F.relu(q), F.relu(k)
    kv = k.transpose(-2, -1) @ v                                    # (N, heads, d, d), bf16, fp32-accumulated
    k_sum = k.sum(dim=-2, dtype=torch.float32).unsqueeze(-1)        # (N, heads, d, 1), fp32
    with torch.autocast(device_type=q.device.type, enabled=False):  # autocast would run this matmul in bf16
        den = torch.matmul(q.float(), k_sum).add_(eps)              # (N, heads, T, 1), fp32
    # In place: the division runs in fp32 (TensorIterator's common dtype) and rounds to bf16 once, the same
    # numbers as (num.float() / den).to(bf16) in one memory pass instead of three (tested bit-identical).
    return (q @ kv).div_(den)                                       # (N, heads, T, d), bf16


def use_bf16_kernel(x: torch.Tensor) -> bool:
    """bf16 CUDA tensors take `linear_attention_kernel_bf16`; everything else (CPU, fp16, fp32) the fp32 kernel."""
    return x.is_cuda and x.dtype == torch.bfloat16


@register_attention("linear")
class LinearAttention(AttentionOp):
    """LiT's linear attention: ReLU kernel, few heads, 5x5 depthwise conv on V, float32 core.

    Options (from the model config's `attention_options`): `linear_heads` (2), `eps` (1e-6),
    `dwc_kernel` (5), `qkv_bias` (True). The model's `num_heads` is ignored on purpose (LiT uses 2
    heads for S/2 and 4 for XL/2); `backend` is accepted for interface parity and unused.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa", linear_heads: int = 2,
                 eps: float = 1e-6, dwc_kernel: int = 5, qkv_bias: bool = True, **_: Any):
        super().__init__()
        heads = int(linear_heads)
        if heads < 1 or dim % heads:
            raise ValueError(f"linear attention: hidden size {dim} is not divisible by linear_heads {heads}; "
                             "set attention_options={'linear_heads': H} with H dividing the hidden size")
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f"linear attention: dwc_kernel must be a positive odd number, got {dwc_kernel}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.eps = float(eps)
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=dwc_kernel, padding=dwc_kernel // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, t, d = h.shape
        gh, gw = grid
        if gh * gw != t:
            raise ValueError(f"linear attention: grid {gh}x{gw} does not hold {t} tokens")
        qkv = self.qkv(h)
        if use_bf16_kernel(qkv):
            return self.proj(self._forward_bf16(qkv, n, t, d, gh, gw))
        with torch.autocast(device_type=h.device.type, enabled=False):
            qkv = qkv.float().reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]                    # (N, heads, T, d_h)
            out = linear_attention_kernel(q, k, v, self.eps)   # float32
            out = out.transpose(1, 2).reshape(n, t, d)
            v_img = v.transpose(1, 2).reshape(n, gh, gw, d).permute(0, 3, 1, 2)
            bias = None if self.dwc.bias is None else self.dwc.bias.float()
            conv = F.conv2d(v_img, self.dwc.weight.float(), bias, padding=self.dwc.padding, groups=d)
            out = out + conv.flatten(2).transpose(1, 2)
        return self.proj(out.to(h.dtype))

    def _forward_bf16(self, qkv: torch.Tensor, n: int, t: int, d: int, gh: int, gw: int) -> torch.Tensor:
        """bf16 on CUDA: tensor-core products with the fp32 normaliser, the depthwise conv in bf16."""
        # One copy to (3, N, heads, T, d_h): the kernel's batched matmuls then read q, k, v as they are; strided
        # views would make each matmul copy its operands (k, v, q and fp32 q: more traffic than this copy).
        heads = qkv.reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        out = linear_attention_kernel_bf16(heads[0], heads[1], heads[2], self.eps).transpose(1, 2).reshape(n, t, d)
        v_img = qkv[..., 2 * d:].reshape(n, gh, gw, d).permute(0, 3, 1, 2)  # V in token order, as the conv wants
        bias = None if self.dwc.bias is None else self.dwc.bias.to(v_img.dtype)
        conv = F.conv2d(v_img, self.dwc.weight.to(v_img.dtype), bias, padding=self.dwc.padding, groups=d)
        return out + conv.flatten(2).transpose(1, 2)

    def flops_breakdown(self, num_tokens: int, grid: tuple[int, int] | None = None) -> dict[str, float]:
        """qkv, proj 4 T D^2; phi(K)^T [V|1] and phi(Q)(...) 2 T D (d_h + 1) (the +1 is the normaliser, same
        matmul); depthwise k x k conv k^2 T D."""
        t, d, k = num_tokens, self.proj.in_features, self.dwc.kernel_size[0]
        return breakdown(projections=4 * t * d * d, products=2 * t * d * (self.head_dim + 1), other=k * k * t * d)


def inherit_from_softmax(student: nn.Module, teacher_state_dict: Mapping[str, torch.Tensor],
                         attention: str = "none") -> dict[str, list[str]]:
    """Copy a trained (softmax) DiT's weights into a student with other attention operators (LiT §4.2).

    `attention` says what to take from the teacher's attention modules (keys containing `.attn.`):
    `"none"` (LiT's finding: inherit everything except attention, re-initialise attn.*),
    `"proj"` (also the output projection, as LiT's T2I code does through strict=False) or
    `"all"` (every attention key whose name and shape match, e.g. `qkv`/`proj` into linear attention
    or into proxy attention's window branch). Non-attention keys must all match: a missing or
    mis-shaped one raises, naming it (a silent random init is the known grafting bug).
    Returns {"loaded": [...], "kept_student": [...], "ignored_teacher": [...]}.
    """
    if attention not in ("none", "proj", "all"):
        raise ValueError(f"attention must be 'none', 'proj' or 'all', got {attention!r}")
    own = student.state_dict()
    loaded, kept, problems = [], [], []
    for key, value in own.items():
        is_attn = ".attn." in key
        take = (not is_attn or attention == "all"
                or (attention == "proj" and ".attn.proj." in key))
        src = teacher_state_dict.get(key)
        if not take or src is None or tuple(src.shape) != tuple(value.shape):
            if not is_attn:
                problems.append(f"{key}: " + ("missing in teacher" if src is None
                                              else f"teacher {tuple(src.shape)} vs student {tuple(value.shape)}"))
            kept.append(key)
            continue
        own[key] = src.to(dtype=value.dtype)
        loaded.append(key)
    if problems:
        raise ValueError("cannot inherit non-attention weights from the teacher:\n  " + "\n  ".join(problems[:12])
                         + "\nFix: build the student with the teacher's preset (same depth, width, patch, classes).")
    student.load_state_dict(own)
    ignored = sorted(set(teacher_state_dict) - set(loaded))
    return {"loaded": loaded, "kept_student": kept, "ignored_teacher": ignored}
