"""Adapters: adapt a trained DiT to new data with a small file, loaded at sampling time.

Kinds, registered by name (`adapter_kind_names()`): `lora` (through peft), `td-lora` (DyDiT++'s
timestep-dynamic LoRA) and `diffscaler` (DiffScaler's Affiner). Targets are groups (`attn`, `mlp`,
`adaln`, `final`) or module-name suffixes, resolved on the model (`dit.adapters.targets`).

    from dit.adapters import add_adapter, save_adapter, adapters_applied
    spec = add_adapter(model, "lora", rank=4, targets=["attn", "mlp"])   # base frozen, adapter trainable
    ... train ...
    save_adapter(model, "adapter.safetensors")                             # the adapter alone + metadata
    with adapters_applied(base, [("adapter.safetensors", 1.0)]):           # sampling; base restored after
        ...

Quantized bases: merge a LoRA first (`merge_adapter`), then quantize (with re-calibration); TD-LoRA
and DiffScaler are not mergeable and are applied on top of a base whose target layers are `nn.Linear`.
"""
from __future__ import annotations

from . import lora, td_lora, diffscaler  # noqa: F401,I001  (register the kinds, in this order)
from .apply import (AdapterState, adapter_parameters, adapter_size_ratio, adapter_state, adapters_applied,
                    add_adapter, attach_adapter, attached_adapters, make_spec, merge_adapter, remove_adapter,
                    remove_adapters, save_adapter, set_adapter_scale, unmerge_adapter)
from .base import ADAPTER_KINDS, AdapterSpec, adapter_kind_names, get_adapter_kind
from .io import AdapterFile, base_variant, base_weights_hash, check_compatible, load_adapter_file
from .targets import DEFAULT_TARGETS, TARGET_GROUPS, resolve_targets, valid_target_names

__all__ = [
    "ADAPTER_KINDS", "AdapterFile", "AdapterSpec", "AdapterState", "DEFAULT_TARGETS", "TARGET_GROUPS",
    "adapter_kind_names", "adapter_parameters", "adapter_size_ratio", "adapter_state", "adapters_applied",
    "add_adapter", "attach_adapter", "attached_adapters", "base_variant", "base_weights_hash", "check_compatible",
    "get_adapter_kind", "load_adapter_file", "make_spec", "merge_adapter", "remove_adapter", "remove_adapters",
    "resolve_targets", "save_adapter", "set_adapter_scale", "unmerge_adapter", "valid_target_names",
]
