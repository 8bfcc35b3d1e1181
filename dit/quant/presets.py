"""Quantization presets and the per-layer plan (which layer gets which format).

Presets (`--preset`, FP by default, integer grids of the same widths with `--int`):

======== ============================================ ============== ==================
preset   weights (FP / INT)                           activations    scales
======== ============================================ ============== ==================
w8a8     E4M3 / INT8                                  E4M3 / INT8    per channel
w4a8     E2M1, E3M0 before GELU / INT4                E3M4 / INT8    groups of 128
w4a6     E2M1, E3M0 before GELU / INT4                E2M3 / INT6    groups of 128
w4       E2M1, E3M0 before GELU / INT4                (full)         groups of 128
w8       E4M3 / INT8                                  (full)         per channel
======== ============================================ ============== ==================

FP4DiT's choices (reference A.3, A.6, A.7): E2M1 weights except the MLP's first linear (the layer
before GELU), which is E3M0; A6 = E2M3, A8 = E3M4; groups of 128 input elements; activations
quantized online per token; attention Q/K/V per token and head. w8a8 uses E4M3 activations so that
the layer can run as a real FP8 GEMM on GPUs (`torch._scaled_mm`, row-wise scales).

Roles of a DiT's linears:
- `attn`: every Linear inside a block's attention operator (softmax qkv/proj, LiT qkv/proj, PT-DiT
  proxy/cross/window/shifted-window projections); those producing Q/K/V also quantize their output
  per (token, head);
- `mlp_in` / `mlp_out`: `mlp.fc1` / `mlp.fc2` (Sana's Mix-FFN convolutions are not Linears and stay
  in full precision);
- `adaln`: the blocks' and the final layer's adaLN modulation Linears and PT-DiT's shifted-window
  modulation: a third of a DiT block's weights; its own format (`--adaln`): `fp8` (default, E4M3 /
  INT8 per channel), `fp4` (the weight format), `none` (full precision) or any format name;
- kept in full precision: patch embedding, timestep and label embedders, the final projection,
  DyDiT routers, LiT's depthwise convolution, norms (they hold no weights in DiT).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from .formats import FormatError, get_format
from .observers import GranularityError, WeightSpec

PRESETS: dict[str, dict[str, Any]] = {
    "w8a8": {"weight": "e4m3", "mlp_in": "e4m3", "act": "e4m3", "int_weight": "int8", "int_act": "int8",
             "granularity": "channel"},
    "w4a8": {"weight": "e2m1", "mlp_in": "e3m0", "act": "e3m4", "int_weight": "int4", "int_act": "int8",
             "granularity": "group"},
    "w4a6": {"weight": "e2m1", "mlp_in": "e3m0", "act": "e2m3", "int_weight": "int4", "int_act": "int6",
             "granularity": "group"},
    "w4": {"weight": "e2m1", "mlp_in": "e3m0", "act": None, "int_weight": "int4", "int_act": None,
           "granularity": "group"},
    "w8": {"weight": "e4m3", "mlp_in": "e4m3", "act": None, "int_weight": "int8", "int_act": None,
           "granularity": "channel"},
}
ADALN_CHOICES = ("fp8", "fp4", "none")
KEEP_DTYPES = ("float16", "bfloat16", "float32")
QKV_NAMES = ("qkv", "proxy_qkv", "cross_q", "cross_kv", "shift_qkv", "to_q", "to_k", "to_v", "q", "k", "v", "kv")
DEFAULT_GROUP = 128

_ROLE_PATTERNS = (
    ("adaln", re.compile(r"^(blocks\.\d+\.adaLN_modulation\.1|final_layer\.adaLN_modulation\.1|"
                         r"blocks\.\d+\.attn\.shift_modulation\.1)$")),
    ("mlp_in", re.compile(r"^blocks\.\d+\.mlp\.fc1$")),
    ("mlp_out", re.compile(r"^blocks\.\d+\.mlp\.fc2$")),
    ("attn", re.compile(r"^blocks\.\d+\.attn\.")),
)


class QuantConfigError(ValueError):
    """A quantization request that cannot run; the message names the fix."""


@dataclass
class QuantConfig:
    """Everything `quantize_model` needs; `python -m dit.quant` fills it from its flags."""

    preset: str = "w4a8"
    int_grid: bool = False
    weight_format: str | None = None      # override the preset's weight format (all roles but mlp_in/adaln)
    mlp_in_format: str | None = None      # override the format of the layer before GELU
    act_format: str | None = None         # override the activation format ('none' = weight-only)
    adaln: str = "fp8"                    # fp8 | fp4 | none | a format name
    granularity: str | None = None        # tensor | channel | group | mx (default: the preset's)
    group_size: int | None = None         # None: 128 where it divides the layer, else per channel; 0: per channel
    keep_dtype: str = "float16"           # storage dtype of the layers kept in high precision
    calib_samples: int = 32               # images whose sampling trajectories are recorded
    calib_steps: int | None = None        # timesteps used of each trajectory (None: all sampler steps)
    calib_scheduler: str | None = None    # default: the checkpoint's studio.json
    calib_sampling_steps: int | None = None
    calib_cfg_scale: float | None = None
    adaround: bool = True                 # scale-aware FP AdaRound for weights of <= 6 bits
    scale_aware: bool = True
    iters: int = 400                      # AdaRound iterations per block (FP4DiT: 2500 on a GPU)
    batch_size: int = 16
    lr: float = 1e-3                      # FP4DiT: 1e-4 with 2500 iterations; fewer iterations, larger steps
    round_weight: float = 0.01            # lambda of the rounding regulariser
    warmup: float = 0.2
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise QuantConfigError(f"unknown preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        if self.calib_samples < 1:
            raise QuantConfigError(f"calibration needs at least one sample (got --calib-samples {self.calib_samples}); "
                                   "e.g. --calib-samples 32")
        if self.calib_steps is not None and self.calib_steps < 1:
            raise QuantConfigError(f"--calib-steps must be at least 1, got {self.calib_steps}")
        if self.iters < 0 or self.batch_size < 1:
            raise QuantConfigError("--iters must be >= 0 and --batch-size >= 1")
        if self.keep_dtype not in KEEP_DTYPES:
            raise QuantConfigError(f"--keep-dtype must be one of {', '.join(KEEP_DTYPES)}")
        if self.group_size is not None and self.group_size < 0:
            raise QuantConfigError(f"--group-size must be >= 0 (0 = per channel), got {self.group_size}")
        for name in (self.weight_format, self.mlp_in_format, self.act_format):
            if name is not None and name != "none":
                get_format(name)  # raises FormatError naming the fix
        if self.adaln not in ADALN_CHOICES:
            get_format(self.adaln)

    # ------------------------------------------------------------------ resolved formats
    def formats(self) -> dict[str, str | None]:
        p = PRESETS[self.preset]
        weight = self.weight_format or (p["int_weight"] if self.int_grid else p["weight"])
        mlp_in = self.mlp_in_format or self.weight_format or (p["int_weight"] if self.int_grid else p["mlp_in"])
        act = self.act_format if self.act_format is not None else (p["int_act"] if self.int_grid else p["act"])
        if act == "none":
            act = None
        if self.adaln == "fp8":
            adaln = "int8" if self.int_grid else "e4m3"
        elif self.adaln == "fp4":
            adaln = weight
        elif self.adaln == "none":
            adaln = None
        else:
            adaln = self.adaln
        return {"attn": weight, "mlp_out": weight, "mlp_in": mlp_in, "adaln": adaln, "act": act}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class LayerPlan:
    name: str
    role: str
    group: str            # calibration unit: "blocks.3" or "final_layer"
    spec: WeightSpec
    act: str | None
    out_group: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "weight": self.spec.as_dict(), "act": self.act, "out_group": self.out_group}


def layer_role(name: str) -> str | None:
    for role, pattern in _ROLE_PATTERNS:
        if pattern.match(name):
            return role
    return None


def _head_dim(model: nn.Module, name: str) -> int | None:
    if name.split(".")[-1] not in QKV_NAMES:
        return None
    parts = name.split(".")
    attn = model.get_submodule(".".join(parts[:3]))  # blocks.i.attn
    return getattr(attn, "head_dim", None)


def build_plan(model: nn.Module, config: QuantConfig) -> list[LayerPlan]:
    """One `LayerPlan` per quantized Linear (raises naming the layer when a group size does not fit)."""
    config.validate()
    formats = config.formats()
    base_gran = config.granularity or PRESETS[config.preset]["granularity"]
    if base_gran not in ("tensor", "channel", "group", "mx"):
        raise QuantConfigError(f"unknown granularity {base_gran!r}; use tensor, channel, group or mx")
    plan = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        role = layer_role(name)
        if role is None or formats[role] is None:
            continue
        fmt = get_format(formats[role])
        gran, size = base_gran, DEFAULT_GROUP
        if role == "adaln" and fmt.bits == 8 and config.granularity is None:
            gran = "channel"  # FP8 / INT8 modulation: one scale per output channel
        elif gran == "group":
            if config.group_size == 0:
                gran = "channel"
            elif config.group_size is not None:
                size = config.group_size
            elif module.in_features % DEFAULT_GROUP:
                gran = "channel"  # the default falls back to per channel (FP4DiT does the same)
        spec = WeightSpec(fmt.name, gran, size)
        try:
            spec.check(module.in_features, name)
        except GranularityError as err:
            raise QuantConfigError(str(err)) from None
        group = "final_layer" if name.startswith("final_layer") else ".".join(name.split(".")[:2])
        plan.append(LayerPlan(name, role, group, spec, formats["act"],
                              _head_dim(model, name) if role == "attn" else None))
    if not plan:
        raise QuantConfigError("no layer to quantize in this model (every role is kept in full precision)")
    return plan


__all__ = ["PRESETS", "QuantConfig", "QuantConfigError", "LayerPlan", "build_plan", "layer_role", "FormatError"]
