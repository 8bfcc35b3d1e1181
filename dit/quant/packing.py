"""Packing quantization codes into bytes so that checkpoint files really shrink.

- 4-bit codes: two per byte, low nibble first, with torchao's `pack_uint4` / `unpack_uint4`
  (`torchao.prototype.mx_formats.kernels`, the same layout its MX / FP4 tensors use).
- 6-bit codes: four per three bytes. torchao 0.18 has no FP6 packing (FP6-LLM's was removed in
  0.15), so this one is written here: bits [c0 | c1 << 6 | c2 << 12 | c3 << 18] as 3 little-endian bytes.
- other widths <= 8 bits: one code per byte (uint8); float8 codes stay torch float8 tensors.

`pack(codes, bits)` works on the last dimension (which must be a multiple of 2 for 4-bit and of 4
for 6-bit); `unpack(packed, bits, n)` returns the (..., n) uint8 codes exactly.
"""
from __future__ import annotations

from typing import Any

import torch

from .formats import torchao_fp_utils


def _torchao_kernels() -> Any:
    torchao_fp_utils()  # quiet first import of torchao
    from torchao.prototype.mx_formats import kernels

    return kernels


class PackingError(ValueError):
    """Codes that cannot be packed as asked."""


def packed_length(n: int, bits: int) -> int:
    """Bytes of the packed last dimension for n codes of `bits` bits."""
    if bits == 4:
        return n // 2
    if bits == 6:
        return n // 4 * 3
    return n


def check_packable(n: int, bits: int) -> None:
    if bits == 4 and n % 2:
        raise PackingError(f"4-bit packing needs an even number of codes per row, got {n}")
    if bits == 6 and n % 4:
        raise PackingError(f"6-bit packing needs a multiple of 4 codes per row, got {n}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (values < 2^bits) -> packed uint8 along the last dimension."""
    if codes.dtype != torch.uint8:
        return codes  # float8 tensors are their own storage
    check_packable(codes.shape[-1], bits)
    if bits == 4:
        return _torchao_kernels().pack_uint4(codes.contiguous())
    if bits == 6:
        c = codes.reshape(*codes.shape[:-1], -1, 4).to(torch.int32)
        word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
        out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1).to(torch.uint8)
        return out.reshape(*codes.shape[:-1], -1)
    return codes.contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 (..., packed_length(n)) -> codes (..., n)."""
    if packed.dtype != torch.uint8:
        return packed
    if packed.shape[-1] != packed_length(n, bits):
        raise PackingError(f"packed row has {packed.shape[-1]} bytes, expected {packed_length(n, bits)} for {n} "
                           f"{bits}-bit codes")
    if bits == 4:
        return _torchao_kernels().unpack_uint4(packed.contiguous())
    if bits == 6:
        b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        out = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1).to(torch.uint8)
        return out.reshape(*packed.shape[:-1], n)
    return packed
