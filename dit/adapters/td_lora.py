"""Timestep-dynamic LoRA (TD-LoRA, DyDiT++: Zhao et al., arXiv 2504.06803, PEFT setting).

K LoRA experts per adapted layer, mixed by a small router that reads only the timestep embedding
E_t (as DyDiT's width routers do; `BlockContext.t_emb`, captured here by a hook on `model.t_embedder`):

    g(t) = gate(W_g E_t + b_g) in R^K                      (softmax by default)
    y    = W x + s * sum_k g_k(t) B_k (A_k dropout(x)),     s = alpha / r   (alpha / sqrt(r): rsLoRA)

Implemented as rank groups: A = [A_1; ...; A_K] (K r x d_in), B = [B_1 ... B_K] (d_out x K r), the
gate repeated r times multiplies the K r bottleneck, so one forward costs one LoRA of rank K r.

The paper's formula is not public in full; the open choices are options (defaults in brackets):

- `experts` [4]: number of experts K (`rank` is each expert's rank r);
- `gate` ["softmax"]: softmax over experts (a convex mix: the update has one LoRA's magnitude), or
  "sigmoid" (independent gates in (0, 1));
- `temperature` [1.0]: logits are divided by it;
- `share_a` [False]: one A shared by all experts (only B_k and the gate differ), r x d_in parameters
  instead of K r x d_in.

Init: A Kaiming-uniform (as peft), B = 0 (so a fresh adapter changes nothing), router weight 0 and
bias 0 (every expert equally weighted at the start). The router belongs to the adapter (saved with it).
The update depends on t, so a TD-LoRA cannot be merged into static weights; it is applied on top.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (AdapterSpec, DeltaKind, TimestepTap, dropout_fn, kaiming_like_peft, register_adapter_kind,
                   remove_timestep_tap, timestep_tap)


class TDLoRADelta(nn.Module):
    """One layer's experts and router; called by `DeltaLinear` as delta(x, y, bias)."""

    def __init__(self, in_features: int, out_features: int, t_dim: int, rank: int, scaling: float,
                 tap: TimestepTap, experts: int = 4, gate: str = "softmax", temperature: float = 1.0,
                 share_a: bool = False, dropout: float = 0.0):
        super().__init__()
        self.rank, self.experts, self.gate, self.temperature = rank, experts, gate, float(temperature)
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(rank if share_a else experts * rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, experts * rank))
        self.router = nn.Linear(t_dim, experts)
        self.dropout = dropout_fn(dropout)
        self._tap = tap  # plain attribute: not a submodule; deep copies map it to the copy's tap
        kaiming_like_peft(self.lora_A)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)

    def gates(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(N, K) expert weights from the timestep embedding."""
        logits = self.router(t_emb.to(self.router.weight.dtype)) / self.temperature
        return logits.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        t_emb = self._tap.t_emb
        if t_emb is None:
            raise RuntimeError("TD-LoRA needs the timestep embedding of the current forward; call the whole DiT "
                               "model (its t_embedder hook feeds the router), not a single layer")
        g = self.gates(t_emb)
        n = x.shape[0]
        if g.shape[0] != n:
            if bool(torch.all(g == g[:1])):
                g = g[:1]  # one timestep for the whole batch (e.g. DyDiT's gathered tokens)
            else:
                raise RuntimeError(f"TD-LoRA: layer input batch {n} does not match the timestep batch {g.shape[0]}")
        g = g.repeat_interleave(self.rank, dim=1)                        # (N, K r)
        g = g.reshape(g.shape[0], *([1] * (x.ndim - 2)), g.shape[1])      # broadcast over tokens
        a = self.lora_A if self.lora_A.shape[0] == self.lora_B.shape[1] else self.lora_A.repeat(self.experts, 1)
        z = F.linear(self.dropout(x), a) * g.to(x.dtype)
        return F.linear(z, self.lora_B) * self.scaling


@register_adapter_kind
class TDLoRAAdapter(DeltaKind):
    name = "td-lora"
    defaults: dict[str, Any] = {"experts": 4, "gate": "softmax", "temperature": 1.0, "share_a": False}

    def options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        opts = super().options(options)
        if int(opts["experts"]) < 1:
            raise ValueError(f"td-lora experts must be at least 1, got {opts['experts']!r}")
        if opts["gate"] not in ("softmax", "sigmoid"):
            raise ValueError(f"td-lora gate must be 'softmax' or 'sigmoid', got {opts['gate']!r}")
        if not float(opts["temperature"]) > 0:
            raise ValueError(f"td-lora temperature must be > 0, got {opts['temperature']!r}")
        return opts

    @staticmethod
    def _t_dim(model: nn.Module) -> int:
        return model.t_embedder.mlp[-1].out_features

    def expected_shapes(self, model: nn.Module, layer: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        o = self.options(spec.options)
        k, r = int(o["experts"]), spec.rank
        return {"lora_A": ((r if o["share_a"] else k * r), layer.in_features), "lora_B": (layer.out_features, k * r),
                "router.weight": (k, self._t_dim(model)), "router.bias": (k,)}

    def make_delta(self, model: nn.Module, base: nn.Linear, spec: AdapterSpec, o: dict[str, Any]) -> nn.Module:
        return TDLoRADelta(base.in_features, base.out_features, self._t_dim(model), spec.rank, spec.scaling,
                           timestep_tap(model), int(o["experts"]), o["gate"], float(o["temperature"]),
                           bool(o["share_a"]), spec.dropout)

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        super().remove(model, adapter_name)
        if not any(isinstance(m, TDLoRADelta) for m in model.modules()):
            remove_timestep_tap(model)
