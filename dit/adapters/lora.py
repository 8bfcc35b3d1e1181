"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) through peft.

    y = W x + s * B (A dropout(x)),   s = alpha / r   (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

`peft.inject_adapter_in_model(LoraConfig(...), model, name)` wraps the target Linear layers in place
(the base Linear becomes `<layer>.base_layer`, untouched); A is Kaiming-uniform and B zero (peft's
defaults), so a fresh adapter changes nothing. Tensors are read with `get_peft_model_state_dict`
(keys `<module>.lora_A.weight`, `<module>.lora_B.weight`: the adapter name stripped, the diffusers
layout) and written back with `set_peft_model_state_dict`. The strength is peft's `set_scale`
(s = strength * alpha / r); `merge` folds W += s B A into the base weight (peft's `merge`, undone by
`unmerge`); several LoRA adapters can be active at once (their updates add).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .base import AdapterKind, AdapterSpec, register_adapter_kind


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@register_adapter_kind
class LoraAdapter(AdapterKind):
    """LoRA via peft on Linear (and, for the `mlp` group of Mix-FFN, 1x1 Conv2d) layers.

    Options: `init` ("kaiming" = peft's default, or "gaussian" = A ~ N(0, 1/r) as diffusers' scripts).
    """

    name = "lora"
    mergeable = True
    defaults: dict[str, Any] = {"init": "kaiming"}

    def check_layer(self, name: str, layer: nn.Module, spec: AdapterSpec) -> None:
        if isinstance(layer, nn.Conv2d):
            limit = min(layer.in_channels, layer.out_channels)
            if spec.rank > limit:
                raise ValueError(f"adapter rank {spec.rank} is larger than layer {name} allows "
                                 f"({layer.in_channels} -> {layer.out_channels} channels: rank at most {limit})")
            return
        super().check_layer(name, layer, spec)

    def expected_shapes(self, model: nn.Module, layer: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        r = spec.rank
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            return {"lora_A.weight": (r, layer.in_channels, kh, kw), "lora_B.weight": (layer.out_channels, r, 1, 1)}
        return {"lora_A.weight": (r, layer.in_features), "lora_B.weight": (layer.out_features, r)}

    def inject(self, model: nn.Module, spec: AdapterSpec, adapter_name: str) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        opts = self.options(spec.options)
        if opts["init"] not in ("kaiming", "gaussian"):
            raise ValueError(f"lora option init must be 'kaiming' or 'gaussian', got {opts['init']!r}")
        active_before = {n: list(m.active_adapters) for n, m in self._all_lora_layers(model)}
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.modules),
                            lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                            init_lora_weights=True if opts["init"] == "kaiming" else "gaussian")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
        # peft makes the newest adapter the only active one: keep the earlier ones active too
        for name, layer in self._all_lora_layers(model):
            keep = [a for a in active_before.get(name, []) if a in layer.lora_A]
            layer.set_adapter(keep + [adapter_name] if adapter_name in layer.lora_A else keep)

    @staticmethod
    def _all_lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return {k: v.detach() for k, v in sd.items()}

    def load_state_dict(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k]
        if unexpected or missing:
            raise ValueError(f"LoRA tensors do not fit the injected layers: unexpected {unexpected[:5]}, "
                             f"missing {missing[:5]}")

    def set_scale(self, model: nn.Module, adapter_name: str, scale: float) -> None:
        for _, layer in _lora_layers(model, adapter_name):
            layer.set_scale(adapter_name, float(scale))

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        for _, layer in _lora_layers(model, adapter_name):
            if adapter_name not in layer.merged_adapters:
                layer.merge(adapter_names=[adapter_name])

    def unmerge(self, model: nn.Module, adapter_name: str) -> None:
        for _, layer in _lora_layers(model, adapter_name):
            # peft's unmerge pops the most recently merged adapters; unmerge all, re-merge the others
            if adapter_name in layer.merged_adapters:
                others = [a for a in layer.merged_adapters if a != adapter_name]
                while layer.merged:
                    layer.unmerge()
                if others:
                    layer.merge(adapter_names=others)

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        self.unmerge(model, adapter_name)
        for name, layer in _lora_layers(model, adapter_name):
            with warnings.catch_warnings():  # "adapter was active, now setting X active": intended here
                warnings.simplefilter("ignore")
                layer.delete_adapter(adapter_name)
            if not layer.lora_A:  # nothing left: put the untouched base layer back
                parent, child = _parent(model, name)
                setattr(parent, child, layer.get_base_layer())
        config = getattr(model, "peft_config", None)
        if isinstance(config, dict):
            config.pop(adapter_name, None)
            if not config:
                del model.peft_config
