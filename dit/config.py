"""Named DiT presets (the `DiT_models` table of Peebles & Xie, 2023, plus small ones for CPUs).

A preset is a dict of `DiT.__init__` keyword arguments; `model_kwargs(name, **overrides)` merges
overrides on top so that CLI, UI and training build models the same way.
"""
from __future__ import annotations

from typing import Any

# depth, hidden size, heads for the paper's four sizes (Table 1 of the DiT paper).
_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

DIT_PRESETS: dict[str, dict[str, Any]] = {}
for _size, (_depth, _width, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        DIT_PRESETS[f"DiT-{_size}/{_patch}"] = dict(
            depth=_depth, hidden_size=_width, num_heads=_heads, patch_size=_patch,
            # ImageNet 256 px latent defaults of the original release
            input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
        )

# Small presets for CPUs and tests: 32x32 single-channel pixels (the embedded digits data).
DIT_PRESETS.update({
    "DiT-Digits/4": dict(depth=8, hidden_size=128, num_heads=4, patch_size=4,
                         input_size=32, in_channels=1, num_classes=10, learn_sigma=True),
    "DiT-Tiny/4": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4,
                       input_size=32, in_channels=1, num_classes=10, learn_sigma=True),
    "DiT-Micro/4": dict(depth=2, hidden_size=64, num_heads=4, patch_size=4,
                        input_size=16, in_channels=1, num_classes=10, learn_sigma=True),
})


def preset_names() -> list[str]:
    return sorted(DIT_PRESETS)


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `DiT(...)` from a preset name, with `None` overrides ignored."""
    if name not in DIT_PRESETS:
        raise ValueError(f"Unknown model preset {name!r}. Valid presets: {', '.join(preset_names())}")
    kwargs = dict(DIT_PRESETS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs
