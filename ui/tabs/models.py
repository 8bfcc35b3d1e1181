"""Models tab: the selected model's card, config, parameters, FLOPs, objective and stored evaluation.

API: `model_info(model)` -> a JSON dict; `list_models` is defined by the app.
"""
from __future__ import annotations

import json
from typing import Any

import gradio as gr

from ..context import Studio, to_json

TITLE = "Models"


def info(ctx: Studio, model_id: str | None) -> dict[str, Any]:
    from dit.flops import model_flops
    from dit.model import count_params

    model, meta, entry = ctx.load_model(model_id)
    cfg = {k: v for k, v in dict(model.config).items() if not str(k).startswith("_")}
    flops = model_flops(model)
    evaluation = None
    folder = entry.path if entry.path.is_dir() else entry.path.parent
    if (folder / "eval.json").is_file() and entry.path.is_dir():
        evaluation = json.loads((folder / "eval.json").read_text())
    card = (folder / "model_card.md").read_text() if entry.path.is_dir() and (folder / "model_card.md").is_file() else None
    return to_json({"id": entry.id, "location": str(entry.path), "kind": entry.kind, "objective": meta.get("objective"),
                    "params": count_params(model), "gflops_per_forward": flops["gflops"], "tokens": flops["tokens"],
                    "sampling_defaults": {k: meta.get(k) for k in ("default_scheduler", "default_steps",
                                                                   "default_cfg_scale")},
                    "class_names": meta.get("class_names"), "config": cfg, "studio": meta,
                    "evaluation": evaluation, "model_card": card})


def summary(d: dict[str, Any]) -> str:
    ev = d.get("evaluation") or {}
    lines = [f"### {d['id']}", f"- kind: **{d['kind']}**, objective: **{d['objective']}**, location: `{d['location']}`",
             f"- parameters: **{d['params'] / 1e6:.3f} M**, {d['gflops_per_forward']:.4f} GFLOPs per forward "
             f"(multiply-adds, DiT paper convention) at {d['tokens']} tokens",
             f"- sampling defaults: {d['sampling_defaults']}"]
    if ev:
        lines.append(f"- stored evaluation (eval.json): classifier agreement **{ev.get('classifier_agreement')}**, "
                     f"Fréchet distance {ev.get('frechet_distance')}, near-copy rate {ev.get('near_copy_rate')}")
    else:
        lines.append("- no stored evaluation (run `python -m dit.eval CKPT --out CKPT/eval.json`)")
    return "\n".join(lines)


def build(ctx: Studio) -> None:
    model = ctx.model_dropdown("Model")
    show = gr.Button("Show", variant="primary")
    text = gr.Markdown()
    with gr.Row():
        config = gr.JSON(label="config.json + studio.json")
        evaluation = gr.JSON(label="Stored evaluation")
    card = gr.Markdown(label="Model card")
    details = gr.JSON(visible=False)

    @ctx.errors
    def model_info(model: str = ctx.default_model_id or "") -> tuple[Any, ...]:
        """Card, config, parameters, FLOPs, objective and stored evaluation of one model."""
        d = info(ctx, model)
        return (summary(d), {"config": d["config"], "studio": d["studio"]}, d["evaluation"],
                d["model_card"] or "*(no model card)*", d)

    outputs = [text, config, evaluation, card, details]
    show.click(model_info, model, outputs, api_name="model_info")
    model.change(model_info, model, outputs, api_visibility="private")
    tab = gr.context.Context.block  # the gr.Tab that app.py opened: fill the card when the tab is opened
    if isinstance(tab, gr.Tab):
        tab.select(model_info, model, outputs, api_visibility="private")
