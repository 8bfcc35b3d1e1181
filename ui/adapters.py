"""Adapter pieces shared by the Generate, Compare and Train tabs (dit.adapters behind them)."""
from __future__ import annotations

from typing import Any

import gradio as gr

from .context import BUNDLED_DIR, Studio

NONE = ""


def adapter_choices(ctx: Studio) -> list[tuple[str, str]]:
    """(label, path) of every adapter file in the models/outputs dirs and the bundled checkpoints/adapters."""
    from dit.adapters.io import find_adapter_files

    roots = [ctx.models_dir, ctx.outputs_dir, BUNDLED_DIR / "adapters"]
    choices = [("none (base model)", NONE)]
    for path in find_adapter_files(*roots):
        root = next((r for r in roots if path.is_relative_to(r)), path.parent)
        choices.append((str(path.relative_to(root)), str(path)))
    return choices


def adapter_components(ctx: Studio, prefix: str) -> list[gr.components.Component]:
    """An adapter dropdown and its strength slider (for the extension blocks of Generate and Compare)."""
    with gr.Row():
        adapter = gr.Dropdown(adapter_choices(ctx), value=NONE, allow_custom_value=True, elem_id=f"{prefix}-adapter",
                              label="Adapter (LoRA / TD-LoRA / DiffScaler file from train.py --adapter)")
        strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Adapter strength (LoRA: x alpha/r)",
                             elem_id=f"{prefix}-adapter-strength")
    return [adapter, strength]


def adapter_extra(ctx: Studio, adapter: str | None, strength: float | None) -> dict[str, Any]:
    """`generate(..., adapters=[(file, strength)])` keyword for a form; {} without an adapter."""
    if not adapter or not str(adapter).strip():
        return {}
    path = ctx.safe_path(adapter)
    from dit.adapters.io import is_adapter_file

    if not is_adapter_file(path):
        raise gr.Error(f"{adapter} is not an adapter file (made by train.py --adapter); pick one from the list")
    return {"adapters": [(str(path), 1.0 if strength is None else float(strength))]}


def adapter_train_flags(kind: str | None, rank: int | None, targets: list[str] | None) -> dict[str, Any]:
    """train.py flags of the Train tab's adapter form; {} for a full training run."""
    from dit.adapters import adapter_kind_names

    if not kind or kind == "none":
        return {}
    if kind not in adapter_kind_names():
        raise gr.Error(f"unknown adapter kind {kind!r}; choose one of {', '.join(adapter_kind_names())}")
    if rank is None or int(rank) < 1:
        raise gr.Error(f"adapter rank must be at least 1 (got {rank})")
    return {"--adapter": kind, "--adapter-rank": int(rank), "--adapter-targets": " ".join(targets or ["attn"])}
