"""Graft tab: a queued job over `dit.graft.run_graft` (the function behind `python -m dit.graft`).

Pick a trained model, what to graft (an attention or MLP operator into chosen blocks, the parallel-block
restructure, or DyDiT routers), the layer spec and the stage budgets; the grafted model is written to a NEW
folder under the models dir, its report (replaced where, parameters, FLOPs, latency, quality before / after,
per-unit stage-1 error, compute) is shown, and it joins every model list, ready for Generate and Compare.
API: `graft`.
"""
from __future__ import annotations

import json
import re
from typing import Any

import gradio as gr

from ..context import Job, Studio, to_json

TITLE = "Graft"
MODES = ("attention", "mlp", "restructure (parallel blocks)", "DyDiT routers")


def _steps_or_auto(value: float | str | None) -> int | None:
    """A steps box: empty or 0 (what an untouched gr.Number shows) means the default budget share."""
    return None if value in (None, "") or int(value) == 0 else int(value)


def settings_for(ctx: Studio, model: str, output_name: str, mode: str, operator: str, layers: str, options: str,
                 stage1_steps: float | None, stage2_steps: float | None, distill: bool, evaluate: bool,
                 eval_per_class: int, dynamic_target: float) -> Any:
    """The `GraftSettings` of a form (a readable `gr.Error` for bad input, before any job starts)."""
    from dit.graft import GraftSettings

    entry = ctx.resolve_model(model)
    name = (output_name or "").strip() or f"{entry.path.name}-graft-{(operator or 'parallel').replace(':', '')}"
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name.split("/"):
        raise gr.Error(f"output name {output_name!r}: use letters, digits, '-', '_', '.' "
                       "(a folder under the models dir)")
    out = ctx.safe_path(name, must_exist=False, write=True)
    if mode not in MODES:
        raise gr.Error(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    kw: dict[str, Any] = {}
    if mode in ("attention", "mlp"):
        kw["replace"] = [f"{mode}={operator}"]
        kw["layers"] = (layers or "all").strip()
    elif mode.startswith("restructure"):
        kw["restructure"] = "parallel"
    else:
        kw["dynamic"] = json.dumps({"target": float(dynamic_target)})
    return GraftSettings(source=str(entry.path), output=str(out), options=(options or "").strip() or None,
                         stage1_steps=_steps_or_auto(stage1_steps), stage2_steps=_steps_or_auto(stage2_steps),
                         distill=bool(distill), evaluate=bool(evaluate), eval_per_class=int(eval_per_class),
                         progress=False, **kw)


def build(ctx: Studio) -> None:
    from dit.attention import attention_names
    from dit.mlp import MLP_REGISTRY

    gr.Markdown("Grafting (Chandrasegaran et al. 2025): swap operators inside a trained DiT, train each new "
                "operator alone to reproduce the old one's outputs (stage 1), then a short fine-tune through "
                "train.py (stage 2). Default budget: 10% of the source's training steps. Layers: `all`, `odd`, "
                "`even`, `0-5`, `3,7,9`, `50%`.")
    with gr.Row():
        model = ctx.model_dropdown("Trained model")
        output_name = gr.Textbox(label="New folder name (under the models dir)", placeholder="dit-digits-linear-50")
    with gr.Row():
        mode = gr.Radio(list(MODES), value="attention", label="Graft")
        operator = gr.Dropdown(attention_names() + [f"{m}" for m in sorted(MLP_REGISTRY)] + ["mlp:3", "mlp:6"],
                               value="linear", label="New operator (attention, or MLP type / mlp:RATIO)")
        layers = gr.Textbox(value="50%", label="Blocks (layer spec)")
        options = gr.Textbox(value="", label="Operator options (JSON)", placeholder='{"window_size": 5}')
    with gr.Row():
        stage1_steps = gr.Number(value=None, precision=0, label="Stage-1 steps (0: 20% of the budget)")
        stage2_steps = gr.Number(value=None, precision=0, label="Stage-2 steps (0: the rest of the budget)")
        dynamic_target = gr.Slider(0.2, 1.0, value=0.7, step=0.05, label="DyDiT FLOPs target (DyDiT mode)")
        distill = gr.Checkbox(value=False, label="Stage 2 distils from the source too")
        evaluate = gr.Checkbox(value=True, label="Evaluate quality (digits models)")
        eval_per_class = gr.Slider(5, 100, value=20, step=5, label="Images per class for the evaluation")
    controls = ctx.report_job_controls("Graft")

    @ctx.errors
    def graft(model: str = ctx.default_model_id or "", output_name: str = "", mode: str = "attention",
              operator: str = "linear", layers: str = "50%", options: str = "", stage1_steps: float | None = None,
              stage2_steps: float | None = None, dynamic_target: float = 0.7, distill: bool = False,
              evaluate: bool = True, eval_per_class: int = 20):
        """Graft `model` into the new folder `output_name`; yields (status, report markdown, report JSON)."""
        from dit.graft.replace import GraftError
        from dit.graft.report import report_markdown
        from dit.graft.run import plan_graft, run_graft

        settings = settings_for(ctx, model, output_name, mode, operator, layers, options, stage1_steps, stage2_steps,
                                distill, evaluate, eval_per_class, dynamic_target)
        try:
            summary = plan_graft(settings)["summary"]  # bad requests fail before the job starts
        except (GraftError, ValueError) as err:
            raise gr.Error(str(err)) from err

        def work(job: Job) -> dict[str, Any]:
            return run_graft(settings, log=lambda s: None, callback=job.report, cancel=job.cancel)

        yield summary, gr.skip(), gr.skip()
        report: dict[str, Any] = yield from ctx.report_job(work)
        new = ctx.add_model(settings.output)
        yield (f"wrote **{new.id}**; it is listed in every model picker (Generate, Compare, Models)",
               report_markdown(report), to_json(report))

    inputs = [model, output_name, mode, operator, layers, options, stage1_steps, stage2_steps, dynamic_target,
              distill, evaluate, eval_per_class]
    ctx.wire_report_job(graft, inputs, controls, api_name="graft")
