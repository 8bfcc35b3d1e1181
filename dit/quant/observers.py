"""Scales: granularity (per tensor / channel / group / MX block), online per-token activation scales,
and the clipping-maximum search that minimises a layer's output error.

Weights (FP4DiT §4.1 / reference A.4): the scale of a group is maxval / fmt.max where maxval is the
group's absmax times a clipping factor alpha. FP4DiT's released code disables its range search
("just use minmax"); the studio searches alpha per output channel on the layer's recorded inputs X,
minimising || X W^T - X W^^T ||^2 (the layer-output criterion of LLM-FP4, Liu et al. 2023), since
that error is separable per output row.

Granularities:
- `tensor`: one scale; `channel`: one per output row; `group`: one per `group_size` consecutive
  input elements of a row (FP4DiT: 128);
- `mx`: OCP MX v1.0 shared block scales: blocks of 32 input elements, scale 2^(floor(log2 amax) - emax)
  stored as an E8M0 exponent byte (bias 127), as torchao's `to_mx` FLOOR mode.

Scales other than MX are stored as float16 (clamped to >= 2^-14, the float16 normal range) and the
quantizer always uses the stored (rounded) value, so the packed model and its simulation agree exactly.
Activations (FP4DiT A.6): scale = absmax over each token's channels (or each head's channels for
attention inputs) / fmt.max, computed online; nothing is calibrated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .formats import NumberFormat, fake_quant, get_format

GRANULARITIES = ("tensor", "channel", "group", "mx")
MX_BLOCK = 32
SCALE_DTYPE = torch.float16
MIN_SCALE = 2.0 ** -14


class GranularityError(ValueError):
    """A scale granularity that does not fit the layer; the message names the fix."""


@dataclass(frozen=True)
class WeightSpec:
    """How one layer's weight is quantized: format, scale granularity, group size (for `group`)."""

    format: str
    granularity: str = "group"
    group_size: int = 128

    @property
    def fmt(self) -> NumberFormat:
        return get_format(self.format)

    def groups(self, in_features: int) -> int:
        """Number of scales per output row."""
        if self.granularity in ("tensor", "channel"):
            return 1
        size = MX_BLOCK if self.granularity == "mx" else self.group_size
        return in_features // size

    def block(self, in_features: int) -> int:
        return in_features // self.groups(in_features)

    def check(self, in_features: int, name: str = "layer") -> None:
        if self.granularity not in GRANULARITIES:
            raise GranularityError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity in ("group", "mx"):
            size = MX_BLOCK if self.granularity == "mx" else self.group_size
            if size < 1 or in_features % size:
                raise GranularityError(
                    f"{name}: group size {size} does not divide its {in_features} input features. Fix: pass a "
                    f"--group-size that divides every quantized layer (e.g. {_divisor_hint(in_features)}), or "
                    "--group-size 0 for per-channel scales")
        bits = self.fmt.bits
        block = self.block(in_features)
        if self.fmt.torch_dtype is None and ((bits == 4 and block % 2) or (bits == 6 and block % 4)):
            raise GranularityError(f"{name}: {bits}-bit codes are packed {'2' if bits == 4 else '4'} at a time; "
                                   f"a block of {block} inputs cannot be packed")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _divisor_hint(n: int) -> str:
    divs = [d for d in (256, 128, 64, 32, 16) if n % d == 0]
    return ", ".join(str(d) for d in divs) or "0"


def grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in) -> (out, groups, in / groups)."""
    return w.reshape(w.shape[0], groups, w.shape[1] // groups)


def weight_amax(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Absmax per scale group: (1, 1) per tensor, (out, 1) per channel, (out, groups) per group / MX block."""
    w = w.detach().float()
    if spec.granularity == "tensor":
        return w.abs().amax().reshape(1, 1)
    return grouped(w, spec.groups(w.shape[1])).abs().amax(dim=-1)


def scales_from_amax(amax: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Stored scales: float16 maxval / fmt.max, or for MX the E8M0 exponent byte of 2^(floor(log2 amax) - emax)."""
    fmt = spec.fmt
    if spec.granularity == "mx":
        exp = torch.floor(torch.log2(amax.float().clamp_min(2.0 ** -126))) - fmt.emax
        return (exp.clamp(-127, 127) + 127).to(torch.uint8)
    return (amax.float() / fmt.max).clamp(min=MIN_SCALE, max=6e4).to(SCALE_DTYPE)


def scale_values(stored: torch.Tensor) -> torch.Tensor:
    """Stored scales -> float32 multipliers (out, groups)."""
    if stored.dtype == torch.uint8:
        return torch.exp2(stored.float() - 127)
    return stored.float()


def quantize_weight(w: torch.Tensor, spec: WeightSpec, stored_scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest grid values in format units, shape (out, in)."""
    s = scale_values(stored_scale).to(w.device)
    g = s.shape[1]
    return spec.fmt.round(grouped(w.float(), g) / s.unsqueeze(-1)).reshape(w.shape)


def dequantize_values(q: torch.Tensor, stored_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Grid values (format units, (out, in)) times their scales -> weights in `dtype`."""
    s = scale_values(stored_scale).to(device=q.device, dtype=dtype)
    g = s.shape[1]
    return (grouped(q.to(dtype), g) * s.unsqueeze(-1)).reshape(q.shape)


def fake_quant_weight(w: torch.Tensor, spec: WeightSpec, stored_scale: torch.Tensor) -> torch.Tensor:
    """The float weight the packed layer will compute with (round to nearest)."""
    return dequantize_values(quantize_weight(w, spec, stored_scale), stored_scale, w.dtype)


@torch.no_grad()
def search_clipping(w: torch.Tensor, x: torch.Tensor | None, spec: WeightSpec,
                    alphas: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)) -> torch.Tensor:
    """Stored scales with the clipping factor per output row that minimises || X (W - W^)^T ||^2.

    `x`: (n, in) recorded layer inputs; None falls back to the weight error || W - W^ ||^2.
    MX scales are powers of two fixed by the block absmax, so they are not searched.
    """
    amax = weight_amax(w, spec)
    if spec.granularity == "mx":
        return scales_from_amax(amax, spec)
    w = w.float()
    candidates, errors = [], []
    for a in alphas:
        stored = scales_from_amax(amax * a, spec)
        diff = w - fake_quant_weight(w, spec, stored)                                      # (out, in)
        err = (x.float() @ diff.t()).pow(2).sum(0) if x is not None else diff.pow(2).sum(1)  # (out,)
        candidates.append(stored)
        errors.append(err)
    err = torch.stack(errors)                                                              # (alphas, out)
    if spec.granularity == "tensor":
        return candidates[int(err.sum(1).argmin())]
    pick = err.argmin(0)                                                                   # (out,)
    stacked = torch.stack(candidates)                                                      # (alphas, out, groups)
    return stacked[pick, torch.arange(w.shape[0])]


# ---------------------------------------------------------------------------------------------- activations
def quantize_tokens(x: torch.Tensor, fmt: NumberFormat | str, group: int | None = None) -> torch.Tensor:
    """Online per-token fake quantization (FP4DiT A.6): scale = absmax over the last dim / fmt.max.

    With `group` (a head dimension) each token's channels are split into groups of that size and each
    group gets its own scale: per (token, head) for attention Q, K, V. Straight-through gradient.
    """
    fmt = get_format(fmt)
    shape = x.shape
    xg = x.reshape(*shape[:-1], shape[-1] // group, group) if group else x
    amax = xg.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / fmt.max).clamp_min(1e-12)
    return fake_quant(xg, fmt, scale).reshape(shape)
