"""What every adapter kind shares: its spec, the kind registry, the wrapper layer of the hand-written
kinds, the timestep tap, and the per-model bookkeeping that lets adapters come off without a trace.

An adapter kind (`lora`, `td-lora`, `diffscaler`) is registered by name; it knows how to inject a fresh
(zero-effect) adapter into named Linear layers, read and write its tensors under keys
`<module name>.<tensor>`, set a strength and remove itself. The base layers themselves are never
modified (LoRA's optional merge is undone by `unmerge`), so removing every adapter restores the
model's exact forward.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

ADAPTER_KINDS: dict[str, "AdapterKind"] = {}
STATE_ATTR = "_dit_adapter_state"


@dataclass
class AdapterSpec:
    """Everything that defines an adapter's shape and scale (saved in the file's metadata).

    `rank`: LoRA rank r (per expert for td-lora, the W_down width for diffscaler); `alpha`: LoRA alpha
    (the update is scaled by alpha / r, or alpha / sqrt(r) with `use_rslora`; default alpha = r, i.e.
    scale 1); `targets`: what the user asked for (groups or suffixes, see `dit.adapters.targets`);
    `modules`: the resolved full module names; `options`: kind-specific settings.
    """

    kind: str
    rank: int
    alpha: float
    targets: list[str]
    modules: list[str]
    dropout: float = 0.0
    use_rslora: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdapterKind:
    """Interface of a registered adapter kind."""

    name = "base"
    #: whether the adapter can be folded into the base weights (then unfolded exactly enough)
    mergeable = False
    #: option names and defaults (validated by `options`)
    defaults: dict[str, Any] = {}

    def options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise ValueError(f"unknown {self.name} option(s) {', '.join(unknown)}; valid options: {valid}")
        return {**self.defaults, **options}

    def check_layer(self, name: str, layer: nn.Module, spec: AdapterSpec) -> None:
        """Raise if `layer` cannot take this adapter (type, rank too large)."""
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{self.name} adapts Linear layers only; {name} is a {type(layer).__name__} "
                             "(use --adapter lora for convolutions, or other targets)")
        limit = min(layer.in_features, layer.out_features)
        if spec.rank > limit:
            raise ValueError(f"adapter rank {spec.rank} is larger than layer {name} allows "
                             f"({layer.in_features} -> {layer.out_features}: rank at most {limit}); lower --adapter-rank")

    def expected_shapes(self, model: nn.Module, layer: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """{tensor suffix: shape} this adapter stores for one layer of `model`."""
        raise NotImplementedError

    def inject(self, model: nn.Module, spec: AdapterSpec, adapter_name: str) -> None:
        raise NotImplementedError

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def set_scale(self, model: nn.Module, adapter_name: str, scale: float) -> None:
        raise NotImplementedError

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, adapter_name: str) -> None:
        raise ValueError(f"a {self.name} adapter cannot be merged into the base weights"
                         + (" (its update depends on the timestep)" if self.name == "td-lora" else
                            " (its ReLU branch is not linear)" if self.name == "diffscaler" else "")
                         + "; apply it on top of the base instead")

    def unmerge(self, model: nn.Module, adapter_name: str) -> None:
        self.merge(model, adapter_name)


def register_adapter_kind(cls: type[AdapterKind]) -> type[AdapterKind]:
    if cls.name in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {cls.name!r} registered twice")
    ADAPTER_KINDS[cls.name] = cls()
    return cls


def adapter_kind_names() -> list[str]:
    return list(ADAPTER_KINDS)


def get_adapter_kind(name: str) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {name!r}; valid kinds: {', '.join(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[name]


# ------------------------------------------------------------------------------------ wrapper layer
class DeltaLinear(nn.Module):
    """`y = base(x) + sum_i scale_i * delta_i(x, base(x))` around an unmodified `nn.Linear`.

    The base layer is kept as `base_layer` (peft's name, so state-dict keys of the base stay
    recognisable) and is called exactly as before; with every delta at its zero init the output is
    bit-identical to the base layer's.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_deltas = nn.ModuleDict()
        self.adapter_scales: dict[str, float] = {}

    # attributes other code reads from a Linear (DyDiT's head mask target, FLOP counters, ...)
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        out = y
        for name, delta in self.adapter_deltas.items():
            scale = self.adapter_scales.get(name, 1.0)
            if scale != 0.0:
                out = out + scale * delta(x, y, self.base_layer.bias)
        return out


def wrap_linear(model: nn.Module, name: str) -> DeltaLinear:
    """The `DeltaLinear` at `name`, wrapping the Linear there first if needed."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, child)
    if isinstance(layer, DeltaLinear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear layer (or it already carries a "
                         "LoRA adapter: remove it before adding another kind there)")
    wrapper = DeltaLinear(layer)
    setattr(parent, child, wrapper)
    return wrapper


def delta_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, DeltaLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, DeltaLinear) and adapter_name in module.adapter_deltas:
            yield name, module


def remove_delta(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter's deltas; a wrapper left with none is replaced by its base layer again."""
    for name, module in list(delta_layers(model, adapter_name)):
        del module.adapter_deltas[adapter_name]
        module.adapter_scales.pop(adapter_name, None)
        if not len(module.adapter_deltas):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)


class DeltaKind(AdapterKind):
    """Shared logic of the hand-written kinds, whose per-layer module lives in `DeltaLinear.adapter_deltas`."""

    def make_delta(self, model: nn.Module, base: nn.Linear, spec: AdapterSpec, options: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def inject(self, model: nn.Module, spec: AdapterSpec, adapter_name: str) -> None:
        options = self.options(spec.options)
        for name in spec.modules:
            wrapper = wrap_linear(model, name)
            base = wrapper.base_layer
            delta = self.make_delta(model, base, spec, options)
            wrapper.adapter_deltas[adapter_name] = delta.to(device=base.weight.device, dtype=base.weight.dtype)
            wrapper.adapter_scales[adapter_name] = 1.0

    def state_dict(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach() for name, layer in delta_layers(model, adapter_name)
                for k, v in layer.adapter_deltas[adapter_name].state_dict().items()}

    def load_state_dict(self, model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `<module>.<tensor>` entries into the deltas named `adapter_name`; every key must be used."""
        used = set()
        with torch.no_grad():
            for name, layer in delta_layers(model, adapter_name):
                for key, param in layer.adapter_deltas[adapter_name].state_dict(keep_vars=True).items():
                    full = f"{name}.{key}"
                    if full not in tensors:
                        raise ValueError(f"adapter file lacks {full}")
                    if tuple(tensors[full].shape) != tuple(param.shape):
                        raise ValueError(f"{full}: file has shape {tuple(tensors[full].shape)}, this model needs "
                                         f"{tuple(param.shape)}")
                    param.copy_(tensors[full])
                    used.add(full)
        extra = sorted(set(tensors) - used)
        if extra:
            raise ValueError(f"adapter file has tensors no layer takes: {', '.join(extra[:6])}")

    def set_scale(self, model: nn.Module, adapter_name: str, scale: float) -> None:
        for _, layer in delta_layers(model, adapter_name):
            layer.adapter_scales[adapter_name] = float(scale)

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        remove_delta(model, adapter_name)


def kaiming_like_peft(weight: torch.Tensor) -> None:
    """peft's default LoRA A init (Kaiming-uniform, a = sqrt(5))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def dropout_fn(p: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ------------------------------------------------------------------------------------ timestep tap
class TimestepTap:
    """Holds the timestep embedding of the current forward (captured by a hook on `model.t_embedder`).

    A plain object whose bound method is the hook, so that `copy.deepcopy(model)` (EMA) gives the copy
    its own tap, wired to the copy's embedder and layers.
    """

    def __init__(self) -> None:
        self.t_emb: torch.Tensor | None = None

    def capture(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        self.t_emb = output


def timestep_tap(model: nn.Module) -> TimestepTap:
    """The model's tap, installing the hook on `model.t_embedder` on first use."""
    embedder = getattr(model, "t_embedder", None)
    if embedder is None:
        raise ValueError("timestep-dynamic adapters need a DiT with a `t_embedder` (the timestep embedding)")
    for hook in embedder._forward_hooks.values():
        if isinstance(getattr(hook, "__self__", None), TimestepTap):
            return hook.__self__
    tap = TimestepTap()
    embedder.register_forward_hook(tap.capture)
    return tap


def remove_timestep_tap(model: nn.Module) -> None:
    embedder = getattr(model, "t_embedder", None)
    if embedder is None:
        return
    for key, hook in list(embedder._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), TimestepTap):
            del embedder._forward_hooks[key]
