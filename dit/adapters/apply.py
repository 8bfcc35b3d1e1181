"""Putting adapters on a model and taking them off again.

- `add_adapter(model, "lora", rank=4, targets=["attn"])`: a fresh, trainable adapter (zero effect);
  the base's parameters are frozen (`requires_grad=False`) and remembered for `remove_adapters`.
- `attach_adapter(model, "file.safetensors", scale=0.8)`: checks the file against the model (variant,
  layer names, shapes, base-weight hash) *before* touching it, then injects and loads; if anything
  still fails the half-attached adapter is removed again (nothing is left loaded half-way).
- `adapters_applied(model, [(path, scale), ...])`: a context manager for sampling; on exit the model
  is exactly the base again (the base layers are never modified; a merged LoRA is unmerged first).
- `merge_adapter` / `unmerge_adapter`: fold a LoRA into the base weights (e.g. before quantizing).
- `save_adapter(model, path)`: the adapter's tensors alone, with metadata (`dit.adapters.io`).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from .base import STATE_ATTR, AdapterSpec, get_adapter_kind
from .io import (AdapterFile, base_variant, base_weights_hash, check_compatible, count,
                 load_adapter_file, save_adapter_file)
from .targets import resolve_targets


@dataclass
class AdapterState:
    """Per-model bookkeeping (a plain attribute, copied along with the model by deepcopy)."""

    base_hash: str = ""
    base_params: int = 0
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    sources: dict[str, AdapterFile | None] = field(default_factory=dict)
    merged: set[str] = field(default_factory=set)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def adapter_state(model: nn.Module, create: bool = True) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = AdapterState(base_hash=base_weights_hash(model),
                             base_params=int(sum(p.numel() for p in model.parameters())),
                             requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
    return state


def attached_adapters(model: nn.Module) -> dict[str, AdapterSpec]:
    state = adapter_state(model, create=False)
    return dict(state.adapters) if state else {}


def _new_name(state: AdapterState, wanted: str | None, hint: str) -> str:
    if wanted:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", wanted):
            raise ValueError(f"adapter name {wanted!r} must be an identifier (letters, digits, _)")
        if wanted in state.adapters:
            raise ValueError(f"an adapter named {wanted!r} is already attached")
        return wanted
    stem = re.sub(r"[^A-Za-z0-9_]", "_", hint) or "adapter"
    i = 0
    while f"{stem}_{i}" in state.adapters:
        i += 1
    return f"{stem}_{i}"


def make_spec(model: nn.Module, kind: str, rank: int = 4, alpha: float | None = None,
              targets: Sequence[str] | str | None = None, dropout: float = 0.0, use_rslora: bool = False,
              options: dict[str, Any] | None = None) -> AdapterSpec:
    """Validate the settings against `model` (targets, rank per layer, options) and resolve targets."""
    k = get_adapter_kind(kind)
    if int(rank) < 1:
        raise ValueError(f"adapter rank must be at least 1, got {rank}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got {dropout}")
    items = [targets] if isinstance(targets, str) else list(targets or ["attn"])
    requested = [t for item in items for t in str(item).replace(",", " ").split()]  # "attn mlp" or "attn,mlp"
    modules = resolve_targets(model, requested)
    spec = AdapterSpec(kind=kind, rank=int(rank), alpha=float(alpha if alpha is not None else rank),
                       targets=requested, modules=modules, dropout=float(dropout), use_rslora=bool(use_rslora),
                       options=k.options(options))
    for name in modules:
        layer = model.get_submodule(name)
        k.check_layer(name, getattr(layer, "base_layer", layer), spec)
    return spec


def _inject(model: nn.Module, spec: AdapterSpec, name: str, scale: float, source: AdapterFile | None) -> None:
    state = adapter_state(model)
    kind = get_adapter_kind(spec.kind)
    other_kinds = {s.kind for s in state.adapters.values()}
    clash = [m for s in state.adapters.values() if s.kind != spec.kind for m in s.modules if m in spec.modules]
    if clash and ("lora" in other_kinds or spec.kind == "lora"):
        raise ValueError(f"a {spec.kind} adapter cannot share layers with an attached LoRA ({clash[0]}, ...); "
                         "use the same kind, or other targets")
    try:
        kind.inject(model, spec, name)
        if source is not None:
            kind.load_state_dict(model, name, {k: v for k, v in source.tensors.items()})
        kind.set_scale(model, name, scale)
    except Exception:
        kind.remove(model, name)
        if not state.adapters:
            remove_adapters(model)
        raise
    state.adapters[name] = spec
    state.scales[name] = float(scale)
    state.sources[name] = source


def add_adapter(model: nn.Module, kind: str, rank: int = 4, alpha: float | None = None,
                targets: Sequence[str] | str | None = None, dropout: float = 0.0, use_rslora: bool = False,
                options: dict[str, Any] | None = None, name: str = "default", freeze_base: bool = True) -> AdapterSpec:
    """Inject a fresh trainable adapter (zero effect at init); the base is frozen unless told otherwise."""
    spec = make_spec(model, kind, rank, alpha, targets, dropout, use_rslora, options)
    state = adapter_state(model)
    name = _new_name(state, name, kind)
    _inject(model, spec, name, 1.0, None)
    if freeze_base:
        for key, param in model.named_parameters():
            param.requires_grad_(_is_adapter_param(key, name))
    return spec


def _is_adapter_param(key: str, name: str) -> bool:
    parts = key.split(".")
    return name in parts and any(p.startswith("lora_") or p == "adapter_deltas" for p in parts)


def adapter_parameters(model: nn.Module, name: str = "default") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one attached adapter."""
    return [(k, p) for k, p in model.named_parameters() if _is_adapter_param(k, name)]


def as_adapter_file(adapter: Any) -> AdapterFile:
    return adapter if isinstance(adapter, AdapterFile) else load_adapter_file(adapter)


def attach_adapter(model: nn.Module, adapter: Any, scale: float = 1.0, name: str | None = None,
                   check_base: bool = True) -> str:
    """Check then attach a saved adapter (path or `AdapterFile`) at strength `scale`; returns its name."""
    source = as_adapter_file(adapter)
    check_compatible(model, source, check_hash=check_base)
    state = adapter_state(model)
    name = _new_name(state, name, Path(source.path).stem if source.path else source.spec.kind)
    param = next(model.parameters())
    source = AdapterFile(source.path, source.spec,
                         {k: v.to(device=param.device, dtype=param.dtype) for k, v in source.tensors.items()},
                         source.base_hash, source.base_variant, source.metadata, source.file_hash)
    _inject(model, source.spec, name, scale, source)
    return name


def set_adapter_scale(model: nn.Module, name: str, scale: float) -> None:
    state = _require(model, name)
    if name in state.merged:
        raise ValueError(f"adapter {name!r} is merged; unmerge it before changing its strength")
    get_adapter_kind(state.adapters[name].kind).set_scale(model, name, scale)
    state.scales[name] = float(scale)


def _require(model: nn.Module, name: str) -> AdapterState:
    state = adapter_state(model, create=False)
    if state is None or name not in state.adapters:
        have = ", ".join(state.adapters) if state and state.adapters else "none"
        raise ValueError(f"no adapter named {name!r} is attached (attached: {have})")
    return state


def merge_adapter(model: nn.Module, name: str = "default") -> None:
    """Fold the adapter into the base weights (LoRA only); `unmerge_adapter` or removal undoes it."""
    state = _require(model, name)
    get_adapter_kind(state.adapters[name].kind).merge(model, name)
    state.merged.add(name)


def unmerge_adapter(model: nn.Module, name: str = "default") -> None:
    state = _require(model, name)
    if name in state.merged:
        get_adapter_kind(state.adapters[name].kind).unmerge(model, name)
        state.merged.discard(name)


def remove_adapter(model: nn.Module, name: str) -> None:
    state = _require(model, name)
    get_adapter_kind(state.adapters[name].kind).remove(model, name)
    state.merged.discard(name)
    for d in (state.adapters, state.scales, state.sources):
        d.pop(name, None)
    if not state.adapters:
        remove_adapters(model)


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter off and restore the base parameters' `requires_grad` flags."""
    state = adapter_state(model, create=False)
    if state is None:
        return
    for name in list(state.adapters):
        get_adapter_kind(state.adapters[name].kind).remove(model, name)
        state.adapters.pop(name)
    for key, param in model.named_parameters():
        if key in state.requires_grad:
            param.requires_grad_(state.requires_grad[key])
    del model.__dict__[STATE_ATTR]


@contextlib.contextmanager
def adapters_applied(model: nn.Module, adapters: Sequence[Any] | None,
                     check_base: bool = True) -> Iterator[list[dict[str, Any]]]:
    """Attach `[(path or AdapterFile, scale), ...]` for the duration of the block; yields their descriptions.

    All adapters are checked before any is attached; on exit (or error) exactly those are removed.
    """
    items = [(a, 1.0) if not isinstance(a, (tuple, list)) else (a[0], float(a[1])) for a in (adapters or [])]
    files = [(as_adapter_file(a), s) for a, s in items]
    for f, _ in files:
        check_compatible(model, f, check_hash=check_base)
    names: list[str] = []
    try:
        for f, s in files:
            names.append(attach_adapter(model, f, s, check_base=False))
        yield [f.describe(s) for f, s in files]
    finally:
        for name in reversed(names):
            remove_adapter(model, name)


def save_adapter(model: nn.Module, path: str | Path, name: str = "default",
                 extra: dict[str, Any] | None = None) -> Path:
    """Write one attached adapter's tensors (and metadata) to `path` (safetensors, atomic)."""
    state = _require(model, name)
    spec = state.adapters[name]
    tensors = get_adapter_kind(spec.kind).state_dict(model, name)
    return save_adapter_file(path, spec, tensors, state.base_hash, base_variant(model), state.base_params, extra)


def adapter_size_ratio(model: nn.Module, name: str = "default") -> float:
    """Adapter parameters / base parameters."""
    state = _require(model, name)
    return count(get_adapter_kind(state.adapters[name].kind).state_dict(model, name)) / max(1, state.base_params)
