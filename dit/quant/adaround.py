"""Scale-aware FP AdaRound (FP4DiT, Chen et al. 2025, Eq. 8) and BRECQ-style block reconstruction.

AdaRound (Nagel et al. 2020) learns, per weight, whether to round down or up:
    w~ = s_g * clip(floor(y / d) d + h(V) d, -max, max),  y = w / s_g  (format units)
with the rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1,
gamma = -0.1, and the regulariser f_reg = sum 1 - |2 h - 1|^beta that pushes h to {0, 1}.
On an FP grid the step d depends on the binade of each weight (`NumberFormat.step`; constant 1 for
INT), so dL/dV is proportional to each weight's own step and binades learn at different rates.
FP4DiT's scale-aware version stores V' = d_w V (d_w = d s_g, the step in weight units) and uses
h'(V') = h(V' / d_w), which removes that factor (reference A.5). Initialisation makes the soft
weight equal the float weight: rest = y / d - floor(y / d), V0 = -log((zeta - gamma) / (rest - gamma) - 1).

Block reconstruction (reference A.5, FP4DiT's settings, scaled for CPU): Adam on the V' of every
quantized layer of one block, loss = || block_q(x_q) - block_fp(x_fp) ||^2 (sum over channels,
mean over tokens; "asym": inputs from the already-quantized preceding network, targets from the
float network) + lambda f_reg, no regulariser for the first `warmup` fraction of iterations, beta
annealed 20 -> 2 afterwards; then hard rounding h = 1[V' >= 0]. Activations are fake-quantized
online (per token, straight-through) during reconstruction, as at inference.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .observers import WeightSpec, grouped, quantize_tokens, scale_values

ZETA, GAMMA = 1.1, -0.1


class AdaRoundLinear(nn.Module):
    """A Linear whose weight is soft-quantized with learnable rounding (used only during calibration)."""

    def __init__(self, linear: nn.Linear, spec: WeightSpec, stored_scale: torch.Tensor, act: str | None = None,
                 out_group: int | None = None, scale_aware: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.spec, self.act, self.out_group, self.scale_aware = spec, act, out_group, scale_aware
        self.stored_scale = stored_scale
        fmt = spec.fmt
        w = linear.weight.detach().float()
        s = scale_values(stored_scale).to(w.device)
        groups = s.shape[1]
        y = grouped(w, groups) / s.unsqueeze(-1)                 # (out, groups, block) in format units
        y = y.clamp(-fmt.max, fmt.max)
        step = fmt.step(y)
        low = torch.floor(y / step)
        rest = (y / step - low).clamp(0.0, 1.0 - 1e-6)
        v0 = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.register_buffer("low", low * step)                  # grid point below (format units)
        self.register_buffer("step", step)
        self.register_buffer("scale", s.unsqueeze(-1))
        self.register_buffer("step_w", step * self.scale)        # the step in weight units
        self.alpha = nn.Parameter(v0 * self.step_w if scale_aware else v0)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.soft = True

    def h(self) -> torch.Tensor:
        v = self.alpha / self.step_w if self.scale_aware else self.alpha
        return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def values(self, soft: bool | None = None) -> torch.Tensor:
        """Quantized weight in format units (out, groups, block): soft (h) or hard (1[V >= 0])."""
        soft = self.soft if soft is None else soft
        h = self.h() if soft else (self.alpha >= 0).float()
        m = self.spec.fmt.max
        return torch.clamp(self.low + h * self.step, -m, m)

    def hard_values(self) -> torch.Tensor:
        """(out, in) grid values after hard rounding."""
        return self.values(soft=False).detach().reshape(self.out_features, self.in_features)

    def weight_now(self) -> torch.Tensor:
        return (self.values() * self.scale).reshape(self.out_features, self.in_features)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = quantize_tokens(x, self.act)
        bias = None if self.bias is None else self.bias.to(x.device)
        y = F.linear(x, self.weight_now().to(x.dtype), bias)
        if self.out_group and self.act is not None:
            y = quantize_tokens(y, self.act, self.out_group)
        return y


def reconstruct(run: Callable[[torch.Tensor], torch.Tensor], layers: Sequence[AdaRoundLinear], num_samples: int,
                target: Callable[[torch.Tensor], torch.Tensor], iters: int = 400, batch_size: int = 16,
                lr: float = 1e-3, round_weight: float = 0.01, warmup: float = 0.2,
                beta_range: tuple[float, float] = (20.0, 2.0), seed: int = 0, progress: bool = True,
                desc: str = "AdaRound", cancel: Any = None) -> list[float]:
    """Optimise the rounding of `layers` so that run(idx) matches target(idx); then switch them to hard.

    `run(idx)` evaluates the quantized block on calibration samples `idx` (a LongTensor) and
    `target(idx)` returns the float block's outputs for the same samples. Returns the loss curve.
    """
    params = [layer.alpha for layer in layers]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    warm = int(warmup * iters)
    for it in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
        if cancel is not None and cancel.is_set():
            from .calibrate import QuantCancelled

            raise QuantCancelled("quantization cancelled; nothing was written")
        idx = torch.randint(0, num_samples, (min(batch_size, num_samples),), generator=gen)
        with torch.enable_grad():
            out = run(idx)
            rec = (out - target(idx)).pow(2).sum(-1).mean()
            loss = rec
            if it >= warm and round_weight > 0:
                frac = (it - warm) / max(1, iters - warm)
                beta = beta_range[0] + (beta_range[1] - beta_range[0]) * frac
                loss = rec + round_weight * sum(layer.regulariser(beta) for layer in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(float(rec.detach()))
    for layer in layers:
        layer.soft = False
    return curve
