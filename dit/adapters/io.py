"""Adapter files: safetensors holding only the adapter's tensors, with metadata that says what they are.

Metadata (all strings, as safetensors requires): `format` "pt", `dit_adapter` (format version "1"),
`kind`, `rank`, `alpha`, `scaling` (alpha / r, or alpha / sqrt(r) with rsLoRA: the unambiguous scale),
`targets` and `modules` (JSON), `spec` (the full `AdapterSpec` as JSON), `base_hash` (see
`base_weights_hash`), `base_variant` (JSON: architecture and attention layout), `base_name`,
`adapter_params`, `base_params`, and optional `training` (JSON: data, steps, command).
Keys are `<module name>.<tensor>` (LoRA: `blocks.0.attn.qkv.lora_A.weight`, the diffusers/peft layout).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import AdapterSpec, get_adapter_kind

FORMAT_VERSION = "1"
VARIANT_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "num_classes", "learn_sigma", "attention", "attention_options", "mlp_type", "dynamic")


def _is_adapter_key(key: str) -> bool:
    return any(p.startswith("lora_") or p == "adapter_deltas" for p in key.split("."))


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors, under their original names, whatever adapters are attached."""
    out = {}
    for key, value in model.state_dict().items():
        if _is_adapter_key(key):
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def base_weights_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the base weights, names and shapes, each tensor rounded to bf16.

    Rounding to bf16 makes fp32 and bf16 copies of one model hash alike. A merged LoRA changes the
    weights, so the hash is taken (and remembered) when the first adapter is attached.
    """
    from .apply import adapter_state

    state = adapter_state(model, create=False)
    if state is not None and state.base_hash:
        return state.base_hash
    h = hashlib.sha256()
    for key, value in sorted(base_state_dict(model).items()):
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        if value.is_floating_point():
            value = value.detach().to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_variant(model: nn.Module) -> dict[str, Any]:
    """The architecture facts an adapter depends on (attention layout as one name per block)."""
    cfg = dict(getattr(model, "config", {}) or {})
    out = {k: cfg.get(k) for k in VARIANT_KEYS}
    if hasattr(model, "block_attention"):
        out["attention"] = list(model.block_attention)
    out["dynamic"] = bool(cfg.get("dynamic"))
    out["class"] = type(model).__name__
    return out


def count(tensors: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() for t in tensors.values()))


@dataclass
class AdapterFile:
    """A loaded (not yet attached) adapter: tensors plus what its metadata says."""

    path: str
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]
    base_hash: str
    base_variant: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    file_hash: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "(in memory)"

    @property
    def num_params(self) -> int:
        return count(self.tensors)

    def describe(self, scale: float) -> dict[str, Any]:
        """What a generated image records about this adapter (PNG metadata)."""
        return {"file": self.name, "sha256": self.file_hash, "kind": self.spec.kind, "rank": self.spec.rank,
                "alpha": self.spec.alpha, "scale": float(scale), "base_hash": self.base_hash}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_adapter_file(path: str | os.PathLike, spec: AdapterSpec, tensors: dict[str, torch.Tensor],
                      base_hash: str, variant: dict[str, Any], base_params: int,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt", "dit_adapter": FORMAT_VERSION, "kind": spec.kind, "rank": str(spec.rank),
        "alpha": str(spec.alpha), "scaling": str(spec.scaling), "use_rslora": str(spec.use_rslora).lower(),
        "targets": json.dumps(spec.targets), "modules": json.dumps(spec.modules), "spec": json.dumps(spec.to_dict()),
        "base_hash": base_hash, "base_variant": json.dumps(variant), "adapter_params": str(count(tensors)),
        "base_params": str(base_params),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # a shareable file, like the checkpoints beside it
    os.replace(tmp, path)
    return path


def load_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and validate an adapter file; a clear `ValueError` for anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); "
                         "an adapter file is written by `train.py --adapter ...`") from err
    if meta.get("dit_adapter") is None or "spec" not in meta:
        raise ValueError(f"{path} is a safetensors file but not a DiT Studio adapter (no `dit_adapter` metadata); "
                         "checkpoints load with --checkpoint, adapters come from `train.py --adapter`")
    if meta["dit_adapter"] != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta['dit_adapter']} is not supported "
                         f"(this studio reads version {FORMAT_VERSION})")
    try:
        spec = AdapterSpec(**json.loads(meta["spec"]))
        variant = json.loads(meta.get("base_variant", "{}"))
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt adapter metadata ({err})") from err
    get_adapter_kind(spec.kind)
    if not tensors:
        raise ValueError(f"{path}: the adapter holds no tensors")
    return AdapterFile(str(path), spec, tensors, meta.get("base_hash", ""), variant, meta, file_sha256(path))


def check_compatible(model: nn.Module, adapter: AdapterFile, check_hash: bool = True) -> None:
    """Raise a `ValueError` naming every mismatch between `adapter` and `model` (nothing is changed)."""
    from .targets import candidate_modules

    variant = base_variant(model)
    diffs = [f"{k}: adapter made for {adapter.base_variant[k]!r}, this model has {variant.get(k)!r}"
             for k in adapter.base_variant if k in variant and adapter.base_variant[k] != variant[k]]
    if diffs:
        raise ValueError(f"adapter {adapter.name} was made for another model variant:\n  " + "\n  ".join(diffs))
    kind = get_adapter_kind(adapter.spec.kind)
    candidates = candidate_modules(model)
    missing = [m for m in adapter.spec.modules if m not in candidates]
    if missing:
        raise ValueError(f"adapter {adapter.name} targets layers this model lacks: {', '.join(missing[:6])}")
    expected: dict[str, tuple[int, ...]] = {}
    for name in adapter.spec.modules:
        layer = model.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        for suffix, shape in kind.expected_shapes(model, layer, adapter.spec).items():
            expected[f"{name}.{suffix}"] = shape
    problems = [f"{k}: missing" for k in expected if k not in adapter.tensors]
    problems += [f"{k}: not an adapter tensor of these layers" for k in adapter.tensors if k not in expected]
    problems += [f"{k}: file {tuple(adapter.tensors[k].shape)} vs model {expected[k]}" for k in expected
                 if k in adapter.tensors and tuple(adapter.tensors[k].shape) != tuple(expected[k])]
    if problems:
        raise ValueError(f"adapter {adapter.name} does not fit this model's layers (shapes differ):\n  "
                         + "\n  ".join(problems[:10]))
    if check_hash and adapter.base_hash:
        own = base_weights_hash(model)
        if own != adapter.base_hash:
            raise ValueError(f"adapter {adapter.name} was trained on a base model with weights hash "
                             f"{adapter.base_hash}, but this model's weights hash to {own} (another base, or a "
                             "fine-tuned copy). Load the base it was made for, or pass --adapter-ignore-base-hash "
                             "(check_base=False) to apply it anyway.")


def is_adapter_file(path: str | os.PathLike) -> bool:
    """True for a safetensors file with DiT Studio adapter metadata (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("dit_adapter") is not None
    except Exception:  # not safetensors, unreadable: not an adapter
        return False


def find_adapter_files(*roots: str | os.PathLike, max_files: int = 200) -> list[Path]:
    """Adapter files under `roots` (recursively), sorted; model weight files are skipped by their metadata."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.safetensors")):
            if len(found) >= max_files:
                return found
            if is_adapter_file(path):
                found.append(path)
    return found
