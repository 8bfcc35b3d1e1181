"""Number formats for post-training quantization: ExMy floating point and signed integer grids.

A format maps a tensor already divided by its scale ("format units") onto a fixed grid. The scale
is what gives the grid a *real-valued exponent bias* (Kuzmin et al. 2022; FP4DiT, Chen et al.,
arXiv 2503.15465, §3): with scale s = maxval / fmt.max the grid's top equals the chosen clipping
maximum `maxval` and every value is 2^(e - b') (1.m) with b' = b + log2(s), a real bias. This is the
form that hardware (MX / NVFP4 / FP8 GEMMs) and torchao use and the only one that can be stored
in `bits`-wide codes, so it is the studio's default (`fake_quant`).

`fp4dit_fake_quant` reproduces the released FP4DiT quantizer bit for bit (its flexible bias keeps
the binade boundaries at powers of two *in x-space*, so for a maxval that is not a power of two
times the format maximum the grid is not a scaled copy of the format's grid and may hold one code
more than `bits` allow: E2M1 with maxval 1 gives {0, .083, .167, .25, .375, .5, .75, 1}). It is
for comparison only and never stored.

ExMy with a sign bit and no codes reserved for Inf/NaN (reference notes §0.1, A.2):
bias b = 2^(e-1) - 1, max = 2^(2^e - 1 - b) (2 - 2^-m), smallest normal exponent 1 - b,
subnormal step 2^(1 - b - m). E2M1 max 6, E1M2 3.5, E3M0 16, E2M3 7.5, E3M2 28, E3M4 31.
The two 8-bit formats torch has dtypes for use them: E4M3 is `torch.float8_e4m3fn` (max 448, the
top code is NaN) and E5M2 is `torch.float8_e5m2` (IEEE, max 57344); their fake-quant is a cast.

Integer grids INTb are symmetric: {-(2^(b-1) - 1), ..., 2^(b-1) - 1} (15 levels for INT4, as E2M1).

Codes (for packed storage): torchao's `custom_fp_utils._f32_to_floatx_unpacked` /
`_floatx_unpacked_to_f32` (round to nearest even, saturating, no special values) encode and decode
every sub-byte and 8-bit ExMy format here; float8 formats are stored as torch float8 tensors;
INTb codes are q + 2^(b-1) in uint8.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch


@functools.lru_cache(maxsize=1)
def torchao_fp_utils() -> Any:
    """torchao's sub-byte FP codec (`torchao.prototype.custom_fp_utils`), imported quietly on first use
    (torchao logs warnings about CUDA extensions it cannot load on a CPU machine)."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.prototype import custom_fp_utils
    except ImportError as err:
        raise ImportError("FP quantization needs torchao (its FP4/FP6 codecs and 4-bit packing): "
                          "pip install -e '.[quant]'") from err
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return custom_fp_utils


class FormatError(ValueError):
    """A number format that cannot exist or is not supported; the message names the valid ones."""


@dataclass(frozen=True)
class NumberFormat:
    """A signed number format: `kind` 'fp' (ExMy) or 'int'; `bits` includes the sign bit."""

    kind: str
    bits: int
    ebits: int = 0
    mbits: int = 0

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        if self.kind == "int":
            return f"int{self.bits}"
        return f"e{self.ebits}m{self.mbits}"

    def __str__(self) -> str:
        return self.name

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch float8 dtype that stores this format natively, if any."""
        if self.kind == "fp" and (self.ebits, self.mbits) == (4, 3):
            return torch.float8_e4m3fn
        if self.kind == "fp" and (self.ebits, self.mbits) == (5, 2):
            return torch.float8_e5m2
        return None

    # ------------------------------------------------------------------ grid facts
    @property
    def bias(self) -> int:
        """IEEE-style exponent bias 2^(e-1) - 1 (FP only)."""
        return 2 ** (self.ebits - 1) - 1

    @property
    def max(self) -> float:
        """Largest finite value (the grid's top)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        if self.torch_dtype is not None:
            return float(torch.finfo(self.torch_dtype).max)
        return float(2.0 ** (2 ** self.ebits - 1 - self.bias) * (2 - 2.0 ** -self.mbits))

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value, 1 - b (below it the step is the subnormal step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """floor(log2(max)): the exponent MX block scales are aligned to (OCP MX v1.0)."""
        return int(math.floor(math.log2(self.max)))

    @functools.cached_property
    def grid(self) -> torch.Tensor:
        """All representable values, sorted, float32 (<= 256 codes, enumerated exactly)."""
        if self.kind == "int":
            return torch.arange(-self.max, self.max + 1, dtype=torch.float32)
        if self.torch_dtype is not None:
            raw = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(self.torch_dtype).float()
        else:
            codes = torch.arange(2 ** self.bits, dtype=torch.int32).to(torch.uint8)
            raw = torchao_fp_utils()._floatx_unpacked_to_f32(codes, self.ebits, self.mbits)
        raw = raw[torch.isfinite(raw)]
        return torch.unique(raw)  # sorted, -0 and 0 merged

    # ------------------------------------------------------------------ quantization (format units)
    def step(self, y: torch.Tensor) -> torch.Tensor:
        """The grid step at each value of `y` (format units): 2^(max(floor(log2|y|), 1-b) - m); INT: 1."""
        if self.kind == "int":
            return torch.ones_like(y)
        # floor(log2|y|) is the float32 exponent field (exact and cheaper than log2; 0 and float32
        # subnormals read -127 and are clamped to the format's subnormal range)
        e = ((y.float().contiguous().view(torch.int32) >> 23) & 0xFF) - 127
        e = e.clamp_(min=self.min_exponent) - self.mbits
        return ((e + 127) << 23).view(torch.float32)

    def round(self, y: torch.Tensor) -> torch.Tensor:
        """Round to the nearest grid value (ties to even), saturating at +-max. No gradient."""
        y = y.float()
        if self.kind == "int":
            return torch.round(y).clamp(-self.max, self.max)
        if self.torch_dtype is not None:
            return y.clamp(-self.max, self.max).to(self.torch_dtype).float()
        s = self.step(y)
        return (torch.round(y / s) * s).clamp(-self.max, self.max)

    # ------------------------------------------------------------------ codes
    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Grid values (format units) -> codes: uint8 (`bits` low bits) or a torch float8 tensor."""
        q = q.float()
        if self.kind == "int":
            return (torch.round(q).clamp(-self.max, self.max) + 2 ** (self.bits - 1)).to(torch.uint8)
        if self.torch_dtype is not None:
            return q.clamp(-self.max, self.max).to(self.torch_dtype)
        return torchao_fp_utils()._f32_to_floatx_unpacked(q.contiguous(), self.ebits, self.mbits)

    @functools.cached_property
    def code_table(self) -> torch.Tensor:
        """Value of every uint8 code (2^bits entries), for decoding by lookup."""
        codes = torch.arange(2 ** self.bits, dtype=torch.int32).to(torch.uint8)
        if self.kind == "int":
            return codes.float() - 2 ** (self.bits - 1)
        return torchao_fp_utils()._floatx_unpacked_to_f32(codes, self.ebits, self.mbits)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes -> values (format units) in `dtype`."""
        if self.torch_dtype is not None:
            return codes.to(dtype)
        table = self.code_table.to(device=codes.device, dtype=dtype)
        return table[codes.long()]


_NAME = re.compile(r"^(?:(?P<fp>fp|float)(?P<fbits>\d+)?[_-]?)?e(?P<e>\d+)m(?P<m>\d+)(?:fn)?$")
_INT = re.compile(r"^u?int(?P<bits>\d+)$")

# The formats the issue asks for by name (any other valid ExMy of <= 8 bits also parses).
NAMED_FORMATS = ("e2m1", "e1m2", "e3m0", "e2m3", "e3m2", "e3m4", "e4m3", "e5m2",
                 "int4", "int6", "int8")


@functools.lru_cache(maxsize=None)
def get_format(name: str | NumberFormat) -> NumberFormat:
    """Parse a format name: 'e2m1', 'fp4_e2m1', 'E4M3', 'float8_e4m3fn', 'int4' ...

    Raises `FormatError` for bits that do not add up ('fp4_e3m2' is 6 bits), more than 8 bits,
    no exponent bit, or an unknown name.
    """
    if isinstance(name, NumberFormat):
        return name
    key = str(name).strip().lower()
    m = _INT.match(key)
    if m:
        bits = int(m.group("bits"))
        if not 2 <= bits <= 8:
            raise FormatError(f"integer format {name!r}: bits must be 2..8 (int4, int6, int8)")
        return NumberFormat("int", bits)
    m = _NAME.match(key)
    if not m:
        raise FormatError(f"unknown number format {name!r}; use ExMy (e.g. {', '.join(NAMED_FORMATS[:8])}), "
                          f"fp<bits>_eXmY, or int<bits> (int4, int6, int8)")
    e, mant = int(m.group("e")), int(m.group("m"))
    bits = 1 + e + mant
    if m.group("fbits") is not None and int(m.group("fbits")) != bits:
        raise FormatError(f"format {name!r}: the bits do not add up: 1 sign + {e} exponent + {mant} mantissa = "
                          f"{bits} bits, not {m.group('fbits')}. Fix: e.g. fp{bits}_e{e}m{mant}, or pick an ExMy "
                          f"with 1 + x + y = {m.group('fbits')}")
    if e < 1:
        raise FormatError(f"format {name!r} has no exponent bit; for a uniform grid use int{bits}")
    if bits > 8:
        raise FormatError(f"format {name!r} has {bits} bits; the studio quantizes to at most 8 bits "
                          "(keep the layer in high precision instead)")
    return NumberFormat("fp", bits, e, mant)


def fake_quant(x: torch.Tensor, fmt: NumberFormat | str, scale: torch.Tensor | float, ste: bool = True) -> torch.Tensor:
    """x -> scale * round_fmt(x / scale), with a straight-through gradient (identity) when `ste`.

    `scale` broadcasts against x (per tensor, channel, group, token or block); with
    scale = maxval / fmt.max the grid's top is maxval (real-valued exponent bias, FP4DiT Eq. 3-4).
    """
    fmt = get_format(fmt)
    q = fmt.round(x.float() / scale) * scale
    q = q.to(x.dtype)
    if ste and x.requires_grad:
        return x + (q - x).detach()
    return q


def fp4dit_fake_quant(x: torch.Tensor, fmt: NumberFormat | str, maxval: torch.Tensor | float) -> torch.Tensor:
    """The released FP4DiT quantizer (`quantize_to_fp8_ste_MM`) with its flexible real-valued bias.

    bias = 2^E - log2(maxval) + log2(2 - 2^-M) - 1; xc = clamp(x, +-maxval);
    ls = clamp(floor(log2|xc|) + bias, min=1); s = 2^(ls - M - bias); x^ = round(xc / s) s.
    For comparison with `fake_quant` only (its grid cannot always be stored in `bits` codes).
    """
    fmt = get_format(fmt)
    if fmt.kind != "fp":
        raise FormatError("fp4dit_fake_quant is for FP formats")
    maxval = torch.as_tensor(maxval, dtype=torch.float32, device=x.device)
    e_bits, m_bits = fmt.ebits, fmt.mbits
    bias = 2 ** e_bits - torch.log2(maxval) + math.log2(2 - 2 ** -m_bits) - 1
    xc = torch.minimum(torch.maximum(x.float(), -maxval), maxval)
    ls = (torch.floor(torch.log2(xc.abs().clamp_min(1e-30))) + bias).clamp(min=1).detach()
    s = torch.exp2(ls - m_bits - bias)
    return (torch.round(xc / s) * s).to(x.dtype)
