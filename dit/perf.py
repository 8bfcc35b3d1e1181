"""Hardware peaks and model-FLOPs utilisation (MFU) for training logs and the GPU benchmark.

MFU = achieved model FLOP/s / the device's dense peak (PaLM's definition, Chowdhery et al. 2022, App. B):
a training step costs 3 forwards (forward + backward = 2x forward), so for images/s at model M
multiply-adds per image (`dit.flops.model_flops`, the DiT paper's count) the achieved rate is
6 * M * images/s FLOP/s (2 FLOPs per multiply-add). Recomputed activations (gradient checkpointing) are
not credited, as in PaLM.

Peaks are the vendors' dense (no sparsity) tensor-core figures for bf16/fp16; TF32 and fp32 are listed
too. Set `DIT_PEAK_TFLOPS` to override (other GPUs, clocks, or a CPU's measured matmul peak).
"""
from __future__ import annotations

import os
from typing import Any

import torch

# name fragment (lower case) -> {dtype: dense TFLOP/s}; the first fragment found in the device name wins
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("h100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),      # SXM
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("a10g", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("4090", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.6, "fp32": 82.6}),
    ("3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("v100", {"bf16": 0.0, "fp16": 125.0, "tf32": 0.0, "fp32": 15.7}),
]


def precision_name(mixed_precision: str | None, dtype: torch.dtype | None = None) -> str:
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `device` at `precision` (bf16 | fp16 | tf32 | fp32), or None when unknown."""
    if os.environ.get("DIT_PEAK_TFLOPS"):
        return float(os.environ["DIT_PEAK_TFLOPS"]) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name and peaks.get(precision):
            return peaks[precision] * 1e12
    return None


def model_macs_per_image(model: Any, input_size: int | None = None) -> float | None:
    """Multiply-adds of one forward of one image (`dit.flops.model_flops`), None if it cannot be counted."""
    try:
        from .flops import model_flops

        return float(model_flops(getattr(model, "module", model), input_size=input_size)["total"])
    except Exception:  # a model the FLOPs counter does not know
        return None


def training_mfu(macs_per_image: float | None, images_per_s: float, peak: float | None) -> float | None:
    """Fraction of the peak used by training at `images_per_s` (6 FLOPs per multiply-add per image)."""
    if not macs_per_image or not peak:
        return None
    return 6.0 * macs_per_image * images_per_s / peak


def forward_mfu(macs_per_image: float | None, images_per_s: float, peak: float | None) -> float | None:
    if not macs_per_image or not peak:
        return None
    return 2.0 * macs_per_image * images_per_s / peak


def enable_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (DiT's train.py and sample.py do the same)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class ThroughputMeter:
    """images/s and the MFU estimate between two logging points of a training run (metrics.jsonl)."""

    def __init__(self, model: Any, args: Any, world: int, device: torch.device, start_step: int | None = None):
        import time

        self._clock = time.perf_counter
        self.images_per_step = args.batch_size * world * args.grad_accum
        self.macs = model_macs_per_image(model)
        self.peak = peak_flops(device, precision_name(args.mixed_precision))
        self.last_step, self.last_time = start_step, self._clock()  # the first interval includes warm-up

    def values(self, step: int) -> dict[str, float]:
        """Call at a logging step, after a host sync (the loss .item()), so the interval is measured truly."""
        now = self._clock()
        out: dict[str, float] = {}
        if self.last_step is not None and step > self.last_step:
            ips = (step - self.last_step) * self.images_per_step / max(1e-9, now - self.last_time)
            out["images_per_sec"] = ips
            mfu = training_mfu(self.macs, ips, self.peak)
            if mfu is not None:
                out["mfu"] = mfu
        if torch.cuda.is_available():
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_step, self.last_time = step, now
        return out
