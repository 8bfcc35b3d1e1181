"""Convert tab: a form over `dit.convert.convert` (official `.pt`, diffusers folder <-> studio folder).

The source must lie inside the models dir (or be a bundled checkpoint); the result is a NEW folder under
the models dir (an existing one is never overwritten) that appears in every model list. API: `convert`.
"""
from __future__ import annotations

import re
from typing import Any

import gradio as gr

from ..context import Studio, to_json

TITLE = "Convert"


def build(ctx: Studio) -> None:
    from dit.config import preset_names

    gr.Markdown(f"Source: an official DiT `.pt`, a diffusers `DiTTransformer2DModel` (or pipeline) folder, or a "
                f"studio folder, given as a path inside `{ctx.models_dir}` (relative paths start there) or a "
                "model id from the list. Nothing is downloaded.")
    with gr.Row():
        source = gr.Textbox(label="Source (path or model id)", placeholder="DiT-XL-2-256x256.pt")
        output_name = gr.Textbox(label="New folder name (under the models dir)", placeholder="dit-xl-2-256")
    with gr.Row():
        to = gr.Radio(["studio", "diffusers"], value="studio", label="Convert to")
        preset = gr.Dropdown([""] + preset_names(), value="", label="Preset to check against (gives the head count)")
    go = gr.Button("Convert", variant="primary")
    status = gr.Markdown(label="status")
    config = gr.JSON(label="config of the new model")

    @ctx.errors
    def convert(source: str = "", output_name: str = "", to: str = "studio", model_preset: str = "") -> tuple[Any, Any]:
        """Convert `source` into a new folder `output_name` under the models dir; returns (status, config)."""
        from dit.convert import convert as run_convert

        ids = {m.id: m for m in ctx.list_models()}
        src = ids[source].path if source in ids else ctx.safe_path(source)
        name = (output_name or "").strip()
        if not name or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name.split("/"):
            raise gr.Error(f"output name {output_name!r}: use letters, digits, '-', '_', '.' (a folder under the "
                           "models dir)")
        out = ctx.safe_path(name, must_exist=False, write=True)
        if out.exists():
            raise gr.Error(f"{out} already exists; choose a new name (the studio never overwrites a model)")
        model = run_convert(src, out, model_preset or None, to)
        entry = ctx.add_model(out)
        cfg = {k: v for k, v in dict(model.config).items() if not str(k).startswith("_")}
        return (f"wrote **{to}** model `{entry.id}` ({out}): depth {model.config.depth}, width "
                f"{model.config.hidden_size}, {model.config.num_classes} classes", to_json(cfg))

    event = go.click(convert, [source, output_name, to, preset], [status, config], api_name="convert", **ctx.queue)
    ctx.models_changed(event)
