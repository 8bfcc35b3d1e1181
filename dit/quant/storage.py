"""Quantized checkpoint folders: packed safetensors + `quant_config.json`, loaded without a float32 copy.

A quantized folder is a studio checkpoint folder whose weights file is `quantized_model.safetensors`:

    config.json                    the DiT config, unchanged (the architecture is the float model's)
    studio.json                    sampling defaults, plus "quantization": {preset, formats, source}
    quant_config.json              {"format": "dit-studio-quant", "version": 1, "layers": {name: layer config},
                                    "keep_dtype": ..., "config": QuantConfig}
    quantized_model.safetensors    <layer>.qweight (packed uint8 or float8), <layer>.wscale, <layer>.bias,
                                   every other tensor in `keep_dtype` (float16 by default, as FP4DiT)
    quant_report.json / .md        what `python -m dit.quant` measured

`DiT.from_pretrained(folder)` (hence `dit.convert.load_any`, sample.py, dit.eval and the UI) sees
`quant_config.json` and calls `load_quantized`: the model skeleton is built on the meta device, the
listed Linears are replaced by empty `QuantLinear`s, and the file's tensors are assigned in place, so
no float32 copy of the quantized weights ever exists (each layer dequantizes only while it runs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import CheckpointError, atomic_folder
from .layers import QuantLinear, set_module

QUANT_CONFIG = "quant_config.json"
QUANT_WEIGHTS = "quantized_model.safetensors"
FORMAT_TAG = "dit-studio-quant"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QuantizedCheckpointError(CheckpointError):
    """A quantized folder that cannot be read or written as asked."""


def is_quantized_folder(path: Any) -> bool:
    p = Path(str(path))
    return p.is_dir() and (p / QUANT_CONFIG).is_file()


def quantized_state_dict(model: nn.Module, keep_dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The tensors to store: QuantLinear codes/scales as they are; every float tensor else in `keep_dtype`."""
    dtype = DTYPES[keep_dtype]
    quant_prefixes = {name + "." for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        in_quant = any(key.startswith(p) for p in quant_prefixes)
        if in_quant and (key.endswith(".qweight") or key.endswith(".wscale")):
            out[key] = value
        elif value.is_floating_point():
            out[key] = value.to(dtype)
        else:
            out[key] = value
    return out


def save_quantized(model: nn.Module, folder: str | os.PathLike, studio: dict[str, Any],
                   quant: dict[str, Any]) -> Path:
    """Write a quantized folder atomically; refuses an existing folder (nothing is ever overwritten)."""
    folder = Path(folder)
    if folder.exists():
        raise QuantizedCheckpointError(f"output folder {folder} already exists; choose a new OUT folder "
                                       "(quantization never overwrites a checkpoint)")
    layers = {name: m.layer_config() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    keep = quant.get("keep_dtype", "float16")
    with atomic_folder(folder) as tmp:
        os.chmod(tmp, 0o755)
        model.save_config(tmp)
        save_file(quantized_state_dict(model, keep), str(tmp / QUANT_WEIGHTS),
                  metadata={"format": "pt", "quantization": FORMAT_TAG})
        (tmp / QUANT_CONFIG).write_text(json.dumps({"format": FORMAT_TAG, "version": 1, "keep_dtype": keep,
                                                    "layers": layers, **quant}, indent=2))
        (tmp / "studio.json").write_text(json.dumps(studio, indent=2))
    return folder


def read_quant_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / QUANT_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QuantizedCheckpointError(f"cannot read {path}: {err}") from None
    if cfg.get("format") != FORMAT_TAG or "layers" not in cfg:
        raise QuantizedCheckpointError(f"{path} is not a DiT Studio quantization config (format {cfg.get('format')!r})")
    return cfg


def load_quantized(folder: str | os.PathLike, cls: type | None = None, device: Any = None,
                   **_: Any) -> nn.Module:
    """Build the model from a quantized folder without materialising float32 weights of its quantized layers."""
    from ..model import DiT

    cls = cls or DiT
    folder = Path(folder)
    qcfg = read_quant_config(folder)
    weights = folder / QUANT_WEIGHTS
    if not weights.is_file():
        raise QuantizedCheckpointError(f"{folder} has {QUANT_CONFIG} but no {QUANT_WEIGHTS}; the folder is incomplete")
    config = json.loads((folder / "config.json").read_text())
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(init)
        for name, layer_cfg in qcfg["layers"].items():
            try:
                model.get_submodule(name)
            except AttributeError:
                raise QuantizedCheckpointError(f"{QUANT_CONFIG} names layer {name!r}, which this DiT config does not "
                                               "have; the folder's config.json and weights disagree") from None
            set_module(model, name, QuantLinear.from_layer_config(layer_cfg))
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt", device=str(device or "cpu")) as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            raise QuantizedCheckpointError(f"{weights} does not match {QUANT_CONFIG} + config.json: missing "
                                           f"{missing[:8]}, unexpected {unexpected[:8]}")
        for key in keys:
            t = f.get_tensor(key)
            want = expected[key]
            if tuple(t.shape) != tuple(want.shape):
                raise QuantizedCheckpointError(f"{key}: file shape {tuple(t.shape)} vs expected {tuple(want.shape)}")
            if not (key.endswith(".qweight") or key.endswith(".wscale")) and t.is_floating_point():
                t = t.to(want.dtype)  # kept layers: small, back to float32 for compute
            state[key] = t
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise QuantizedCheckpointError(f"tensors not found in {weights}: {leftover[:8]}")
    model.requires_grad_(False)
    return model.eval()
