"""DiffScaler (Nair, Valanarasu, Patel, "Diffscaler: Enhancing the Generative Prowess of Diffusion
Transformers", arXiv 2404.09976): the "Affiner" at each adapted layer of a frozen DiT,

    y = (1 + a) ⊙ (W x) + b_hat + b + s · W_up · ReLU(W_down · x)

with a, b per output channel (re-scaling and shifting the pretrained subspace), W_down (r x d_in) and
W_up (d_out x r) a non-linear bottleneck spanning a task-specific new subspace, s a learned scalar.
Identity at initialisation: a = 0, b = 0, W_up = 0, s = 1 (W_down Kaiming-uniform). Trainable
parameters per layer: 2 d_out + r (d_in + d_out) + 1.

Several task adapters live on one base model: each file is one task; attaching several (with weights
w_i) gives y = W x + b_hat + sum_i w_i Δ_i(x), where Δ_i = a_i ⊙ W x + b_i + s_i W_up,i ReLU(W_down,i x);
one task at weight 1 is exactly the formula above, weights summing to 1 interpolate tasks. The ReLU
branch is not linear, so DiffScaler is applied on top of the base, never merged.

Options: `nonlinearity` ["relu"] (the paper's; "gelu" or "identity" as alternatives), `scale_init` [1.0].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterSpec, DeltaKind, dropout_fn, kaiming_like_peft, register_adapter_kind

NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "identity": lambda z: z}


class AffinerDelta(nn.Module):
    """Δ(x) = a ⊙ (W x) + b + s · W_up · act(W_down · x); W x is the base output minus its bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, nonlinearity: str = "relu",
                 scale_init: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(out_features))
        self.b = nn.Parameter(torch.zeros(out_features))
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.s = nn.Parameter(torch.full((), float(scale_init)))
        self.nonlinearity = nonlinearity
        self.dropout = dropout_fn(dropout)
        kaiming_like_peft(self.down)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        wx = y if bias is None else y - bias
        act = NONLINEARITIES[self.nonlinearity]
        branch = F.linear(act(F.linear(self.dropout(x), self.down)), self.up)
        return self.a * wx + self.b + self.s * branch


@register_adapter_kind
class DiffScalerAdapter(DeltaKind):
    name = "diffscaler"
    defaults: dict[str, Any] = {"nonlinearity": "relu", "scale_init": 1.0}

    def options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        opts = super().options(options)
        if opts["nonlinearity"] not in NONLINEARITIES:
            raise ValueError(f"diffscaler nonlinearity must be one of {', '.join(NONLINEARITIES)}, "
                             f"got {opts['nonlinearity']!r}")
        return opts

    def expected_shapes(self, model: nn.Module, layer: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        d_in, d_out, r = layer.in_features, layer.out_features, spec.rank
        return {"a": (d_out,), "b": (d_out,), "down": (r, d_in), "up": (d_out, r), "s": ()}

    def make_delta(self, model: nn.Module, base: nn.Linear, spec: AdapterSpec, o: dict[str, Any]) -> nn.Module:
        return AffinerDelta(base.in_features, base.out_features, spec.rank, o["nonlinearity"],
                            float(o["scale_init"]), spec.dropout)
