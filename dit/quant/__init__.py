"""FP quantization of DiTs (FP4DiT, Chen et al., arXiv 2503.15465): formats, calibration, packed storage.

    python -m dit.quant checkpoints/dit-digits out/digits-w4a8 --preset w4a8

Modules: `formats` (ExMy / INT grids, fake-quant, codes), `packing` (two 4-bit codes per byte, ...),
`observers` (scale granularity, clipping search, online per-token activations), `adaround`
(scale-aware FP AdaRound, block reconstruction), `calibrate` (trajectories, block-by-block PTQ),
`layers` (`QuantLinear`), `presets` (w8a8, w4a8, w4a6, w4, w8; FP or INT), `storage` (quantized
folders, loading without a float32 copy), `report` (JSON + Markdown), `api` (`quantize_checkpoint`).
"""
from .formats import FormatError, NumberFormat, fake_quant, fp4dit_fake_quant, get_format
from .layers import QuantLinear
from .observers import WeightSpec
from .presets import PRESETS, QuantConfig, QuantConfigError, build_plan
from .storage import QUANT_CONFIG, QUANT_WEIGHTS, is_quantized_folder, load_quantized, save_quantized

__all__ = ["FormatError", "NumberFormat", "fake_quant", "fp4dit_fake_quant", "get_format", "QuantLinear",
           "WeightSpec", "PRESETS", "QuantConfig", "QuantConfigError", "build_plan", "QUANT_CONFIG",
           "QUANT_WEIGHTS", "is_quantized_folder", "load_quantized", "save_quantized"]
