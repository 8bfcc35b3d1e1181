"""`QuantLinear`: a Linear whose weight lives as packed codes + scales and is dequantized per call.

Storage (buffers, saved in safetensors): `qweight` (uint8 packed codes: two 4-bit codes per byte,
four 6-bit codes per three bytes, one 8-bit code per byte; or a torch float8 tensor for E4M3/E5M2)
and `wscale` (float16 scales, or E8M0 exponent bytes for MX blocks), plus the float `bias`.

Forward (FP4DiT inference):
1. online per-token activation fake-quant of the input (`act`, e.g. E2M3 at 6 bits, E3M4 at 8),
2. weight dequantized for this call only (never kept), `F.linear`,
3. for the layers that produce attention Q/K/V (`out_group` = head dimension), per-(token, head)
   fake-quant of the output, which is FP4DiT's quantization of Q, K and V after the head split
   (softmax, the attention products and the linear-attention normaliser stay in high precision).

On CUDA GPUs with FP8 support (SM 8.9+), an E4M3 per-channel weight with E4M3 per-token activations
(preset w8a8) runs through torch's row-wise scaled FP8 matmul (`torch._scaled_mm`) instead; this
machine has no GPU, so that path is exercised on CPU in the tests (`scaled_mm=True`, which torch
supports functionally for row-wise scales) and was not timed.

`weight` is a read-only property returning the dequantized weight for code that reads `.weight`
(e.g. a device lookup); it costs one dequantization of this layer.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .formats import get_format
from .observers import WeightSpec, dequantize_values, quantize_tokens, quantize_weight
from .packing import pack, packed_length, unpack


class QuantLinear(nn.Module):
    """y = Q_out( Q_act(x) W^T + b ) with W = dequant(qweight, wscale); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: WeightSpec,
                 act: str | None = None, out_group: int | None = None, device: Any = None,
                 scaled_mm: bool | str = "auto"):
        super().__init__()
        spec.check(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        self.act = act
        self.out_group = out_group
        self.scaled_mm = scaled_mm
        fmt = spec.fmt
        groups = spec.groups(in_features)
        block = in_features // groups
        if fmt.torch_dtype is not None:
            qweight = torch.empty(out_features, in_features, dtype=fmt.torch_dtype, device=device)
        else:
            qweight = torch.empty(out_features, groups * packed_length(block, fmt.bits), dtype=torch.uint8,
                                  device=device)
        scale_dtype = torch.uint8 if spec.granularity == "mx" else torch.float16
        self.register_buffer("qweight", qweight)
        self.register_buffer("wscale", torch.empty(out_features if spec.granularity != "tensor" else 1, groups,
                                                   dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_values(cls, linear: nn.Linear, spec: WeightSpec, values: torch.Tensor, stored_scale: torch.Tensor,
                    act: str | None = None, out_group: int | None = None) -> "QuantLinear":
        """From grid values in format units (out, in) (e.g. AdaRound's hard rounding) and stored scales."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec, act, out_group,
                    device=linear.weight.device)
        fmt = spec.fmt
        codes = fmt.encode(values.detach())
        if codes.dtype == torch.uint8:
            groups = spec.groups(linear.in_features)
            block = linear.in_features // groups
            codes = pack(codes.reshape(linear.out_features, groups, block), fmt.bits).reshape(linear.out_features, -1)
        layer.qweight.copy_(codes)
        layer.wscale.copy_(stored_scale.expand_as(layer.wscale))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: WeightSpec, stored_scale: torch.Tensor, act: str | None = None,
                    out_group: int | None = None) -> "QuantLinear":
        """Round to nearest with the given scales."""
        values = quantize_weight(linear.weight.detach(), spec, stored_scale)
        return cls.from_values(linear, spec, values, stored_scale, act, out_group)

    # ------------------------------------------------------------------ weights
    def codes(self) -> torch.Tensor:
        """Unpacked codes (out, in): uint8 or float8."""
        fmt = self.spec.fmt
        if self.qweight.dtype != torch.uint8:
            return self.qweight
        groups = self.spec.groups(self.in_features)
        block = self.in_features // groups
        packed = self.qweight.reshape(self.out_features, groups, -1)
        return unpack(packed, fmt.bits, block).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in `dtype`, computed now (not cached)."""
        values = self.spec.fmt.decode(self.codes(), dtype)
        return dequantize_values(values, self.wscale, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def storage_bytes(self) -> int:
        total = self.qweight.numel() * self.qweight.element_size() + self.wscale.numel() * self.wscale.element_size()
        return total + (self.bias.numel() * 2 if self.bias is not None else 0)

    # ------------------------------------------------------------------ forward
    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.scaled_mm is False or self.out_group or self.act is None:
            return False
        fmt = self.spec.fmt
        if fmt.torch_dtype is not torch.float8_e4m3fn or self.spec.granularity != "channel":
            return False
        if get_format(self.act).torch_dtype is not torch.float8_e4m3fn:
            return False
        if self.scaled_mm is True:
            return True
        return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Row-wise scaled FP8 GEMM: per-token E4M3 activations x per-channel E4M3 weights."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        xs = (x2.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        xq = (x2 / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
        # CUDA: bf16 out, the one output type every row-wise backend takes (the CUTLASS path of sm89 / older
        # CUDA rejects fp32); the CPU kernel (tests) also writes fp32
        out_dtype = torch.bfloat16 if x.is_cuda or x.dtype != torch.float32 else torch.float32
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.wscale.float().reshape(1, -1),
                               out_dtype=out_dtype).to(x.dtype)
        if self.bias is not None:  # added in the input's precision (fp32 stays fp32)
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_scaled_mm(x):
            return self._fp8_matmul(x)
        if self.act is not None:
            x = quantize_tokens(x, self.act)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = F.linear(x, self.dequantize(x.dtype), bias)
        if self.out_group and self.act is not None:
            y = quantize_tokens(y, self.act, self.out_group)
        return y

    # ------------------------------------------------------------------ bookkeeping
    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        """Module.to(dtype) must move, never cast, the codes and scales."""
        saved = {name: getattr(self, name) for name in ("qweight", "wscale")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:  # a dtype cast reached the codes: keep them, only move them
                self._buffers[name] = old.to(device=new.device)
        return self

    def layer_config(self) -> dict[str, Any]:
        """What `quant_config.json` records to rebuild this layer."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "weight": self.spec.as_dict(), "act": self.act, "out_group": self.out_group}

    @classmethod
    def from_layer_config(cls, cfg: dict[str, Any], device: Any = None) -> "QuantLinear":
        return cls(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg["bias"]), WeightSpec(**cfg["weight"]),
                   cfg.get("act"), cfg.get("out_group"), device=device)

    def extra_repr(self) -> str:
        s = self.spec
        gran = f"group {s.group_size}" if s.granularity == "group" else s.granularity
        return (f"in={self.in_features}, out={self.out_features}, weight={s.format} ({gran}), act={self.act}"
                + (f", qkv heads of {self.out_group}" if self.out_group else ""))


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` ("blocks.0.attn.qkv") of `root` by `module`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
