"""Feed-forward layers of a DiT block, registered by name.

- `mlp`: DiT's Linear -> GELU(tanh) -> Linear with ratio 4 (keys `fc1`, `fc2`, as timm's `Mlp`).
- `mixffn`: Sana's Mix-FFN (GLUMBConv): 1x1 conv -> SiLU -> 3x3 depthwise -> gated -> 1x1 conv.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MLP_REGISTRY: dict[str, type[nn.Module]] = {}


def register_mlp(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        MLP_REGISTRY[name] = cls
        return cls
    return wrap


def build_mlp(name: str, dim: int, mlp_ratio: float) -> nn.Module:
    if name not in MLP_REGISTRY:
        raise ValueError(f"Unknown MLP type {name!r}. Valid types: {', '.join(sorted(MLP_REGISTRY))}")
    return MLP_REGISTRY[name](dim, mlp_ratio)


FUSED_GELU = os.environ.get("DIT_FUSED_GELU", "1") != "0"  # DIT_FUSED_GELU=0: always Linear, then GELU


def fused_gelu_applies(x: torch.Tensor, fc1: nn.Module) -> bool:
    """Whether fc1 + GELU(tanh) runs as ONE cuBLASLt matmul with a GELU epilogue (`torch._addmm_activation`,
    whose CUDA GELU is the tanh approximation DiT uses): saves writing and re-reading the 4D-wide hidden
    activation, ~10% of an XL block's memory traffic. Only for half-precision CUDA inference on a plain,
    hook-free Linear (the op has no backward; the CPU op applies the exact erf GELU; DyDiT masks fc1 by hooks;
    adapters and quantized layers replace the Linear); everywhere else Linear then GELU as before."""
    return (FUSED_GELU and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and type(fc1) is nn.Linear
            and fc1.weight.dtype == x.dtype and fc1.bias is not None and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cuda") and not fc1._forward_hooks and not fc1._forward_pre_hooks)


@register_mlp("mlp")
class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if fused_gelu_applies(x, self.fc1):
            hidden = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(),
                                             use_gelu=True).reshape(*x.shape[:-1], self.fc1.out_features)
            return self.fc2(hidden)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def flops(self, num_tokens: int, grid: tuple[int, int] | None = None) -> float:
        """fc1 and fc2: 2 T D D_hidden multiply-adds."""
        return float(2 * num_tokens * self.fc1.in_features * self.fc1.out_features)


@register_mlp("mixffn")
class MixFFN(nn.Module):
    """Sana's GLUMBConv on the token grid; hidden width = mlp_ratio * dim * 5/8 keeps params near DiT's MLP."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio * 5 / 8)
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        n, t, d = x.shape
        gh, gw = grid
        y = x.transpose(1, 2).reshape(n, d, gh, gw)
        y = self.conv_depth(F.silu(self.conv_inverted(y)))
        y, gate = y.chunk(2, dim=1)
        y = self.conv_point(y * F.silu(gate))
        return y.flatten(2).transpose(1, 2)

    def flops(self, num_tokens: int, grid: tuple[int, int] | None = None) -> float:
        """1x1 D -> 2h, depthwise 3x3 on 2h, 1x1 h -> D."""
        d, h2 = self.conv_inverted.in_channels, self.conv_inverted.out_channels
        return float(num_tokens * (d * h2 + 9 * h2 + h2 // 2 * d))
