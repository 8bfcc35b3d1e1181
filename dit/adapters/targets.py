"""Which layers of a DiT an adapter may adapt, by group name or by module-name suffix.

Groups (resolved on the actual model, so every attention operator is covered by its real names):

======= ===========================================================================================
group   modules
======= ===========================================================================================
attn    every Linear inside each block's attention operator: softmax / linear (LiT) `qkv` (fused
        q, k, v) and `proj` (out); PT-DiT proxy `proxy_qkv`, `proxy_proj`, `cross_q`, `cross_kv`,
        `cross_out`, `qkv`, `proj`, `shift_qkv`, `shift_proj` (the default target)
mlp     the block MLP's layers (`mlp.fc1`, `mlp.fc2`; Mix-FFN's 1x1 convolutions, LoRA only)
adaln   the adaLN-Zero modulation Linear of each block (`adaLN_modulation.1`) and PT-DiT's
        `attn.shift_modulation.1`
final   the final layer's `final_layer.linear` and `final_layer.adaLN_modulation.1`
======= ===========================================================================================

DyDiT routers, the embedders and LiT's depthwise convolution are never targets. A target that is not a
group name is matched as peft does: a module whose full name equals it or ends with `.<target>`
(e.g. `qkv`, `attn.proj`, `blocks.3.mlp.fc2`, `final_layer.linear`).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

TARGET_GROUPS = ("attn", "mlp", "adaln", "final")
DEFAULT_TARGETS = ("attn",)


def _group_of(name: str, module: nn.Module) -> str | None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or "_router" in name:
        return None
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 3:
        if parts[2] == "attn":
            if "modulation" in name:
                return "adaln" if isinstance(module, nn.Linear) else None
            return "attn" if isinstance(module, nn.Linear) else None
        if parts[2] == "mlp":
            return "mlp" if isinstance(module, nn.Linear) or module.kernel_size == (1, 1) else None
        if parts[2] == "adaLN_modulation":
            return "adaln" if isinstance(module, nn.Linear) else None
    if parts[0] == "final_layer" and isinstance(module, nn.Linear):
        return "final"
    return None


def candidate_modules(model: nn.Module) -> dict[str, str]:
    """{module name: group} of every layer an adapter may target, in model order."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") or p == "adapter_deltas" for p in parts):
            continue  # inside an attached adapter
        if parts[-1] == "base_layer":  # the wrapped layer of an attached adapter keeps its original name
            name = ".".join(parts[:-1])
        group = _group_of(name, module)
        if group is not None:
            found[name] = group
    return found


def valid_target_names(model: nn.Module) -> list[str]:
    """Group names plus the per-block module suffixes (`attn.qkv`, `mlp.fc1`, ...) and final-layer names."""
    suffixes = set()
    for name in candidate_modules(model):
        parts = name.split(".")
        suffixes.add(".".join(parts[2:]) if parts[0] == "blocks" else name)
    return list(TARGET_GROUPS) + sorted(suffixes)


def resolve_targets(model: nn.Module, targets: Sequence[str] | str | None) -> list[str]:
    """The full module names that `targets` (groups and/or suffixes) select; raises naming the valid ones."""
    if targets is None:
        targets = DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    if not targets:
        raise ValueError("no adapter targets given; valid targets: " + ", ".join(valid_target_names(model)))
    candidates = candidate_modules(model)
    chosen: set[str] = set()
    unknown = []
    for target in targets:
        if target in TARGET_GROUPS:
            hits = {n for n, g in candidates.items() if g == target}
        else:
            hits = {n for n in candidates if n == target or n.endswith("." + target)}
        if not hits:
            unknown.append(target)
        chosen |= hits
    if unknown:
        raise ValueError(f"adapter target(s) {', '.join(map(repr, unknown))} match no adaptable layer of this model; "
                         f"valid targets: {', '.join(valid_target_names(model))}")
    return [n for n in candidates if n in chosen]
