"""Quantize tab: a queued job over `dit.quant.api.quantize_checkpoint` (the function behind `python -m dit.quant`).

Pick a model, a preset (FP or INT grids) and the adaLN format; the calibrated, packed model is written to a
NEW folder under the models dir, its report (file size, per-layer error, quality before/after for digits
models) is shown, and it joins every model list, ready for Generate and Compare. API: `quantize`.
"""
from __future__ import annotations

import re
from typing import Any

import gradio as gr

from ..context import Job, Studio, to_json

TITLE = "Quantize"


def build(ctx: Studio) -> None:
    from dit.quant.presets import PRESETS

    gr.Markdown("Post-training quantization with FP4DiT's recipe: FP formats (E2M1 weights, E3M0 before GELU, "
                "E2M3/E3M4 activations per token), scale-aware AdaRound on the model's own sampling trajectories, "
                "packed weights (two 4-bit codes per byte). `--int` grids of the same widths for comparison.")
    with gr.Row():
        model = ctx.model_dropdown("Float model")
        output_name = gr.Textbox(label="New folder name (under the models dir)", placeholder="dit-digits-w4a8")
    with gr.Row():
        preset = gr.Radio(list(PRESETS), value="w4a8", label="Preset")
        integer = gr.Checkbox(value=False, label="Integer grids (INT) instead of FP")
        adaln = gr.Dropdown(["fp8", "fp4", "none"], value="fp8", label="adaLN modulation weights")
    with gr.Row():
        calib_samples = gr.Slider(1, 128, value=32, step=1, label="Calibration trajectories (images)")
        iters = gr.Slider(0, 2500, value=400, step=50, label="AdaRound iterations per block (0 = round to nearest)")
        evaluate = gr.Checkbox(value=True, label="Evaluate quality (digits models)")
        eval_per_class = gr.Slider(5, 100, value=20, step=5, label="Images per class for the evaluation")
    controls = ctx.report_job_controls("Quantize")

    @ctx.errors
    def quantize(model: str = ctx.default_model_id or "", output_name: str = "", preset: str = "w4a8",
                 integer: bool = False, adaln: str = "fp8", calib_samples: int = 32, iters: int = 400,
                 evaluate: bool = True, eval_per_class: int = 20):
        """Quantize `model` into the new folder `output_name`; yields (status, report markdown, report JSON)."""
        from dit.quant import QuantConfig
        from dit.quant.api import check_request, quantize_checkpoint
        from dit.quant.report import format_report

        entry = ctx.resolve_model(model)
        name = (output_name or "").strip() or f"{entry.path.name}-{preset}{'-int' if integer else ''}"
        if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name.split("/"):
            raise gr.Error(f"output name {output_name!r}: use letters, digits, '-', '_', '.' (a folder under the "
                           "models dir)")
        out = ctx.safe_path(name, must_exist=False, write=True)
        config = QuantConfig(preset=preset, int_grid=bool(integer), adaln=adaln, calib_samples=int(calib_samples),
                             iters=int(iters), extra={"command": f"UI Quantize tab: {entry.id} -> {name}"})
        check_request(entry.path, out, config)  # bad requests fail before the job starts

        def work(job: Job) -> dict[str, Any]:
            return quantize_checkpoint(entry.path, out, config, evaluate=bool(evaluate),
                                       eval_per_class=int(eval_per_class), progress=False, log=lambda s: None,
                                       callback=job.report, cancel=job.cancel)

        yield f"quantizing `{entry.id}` -> `{out}` ({preset}, {'INT' if integer else 'FP'})", gr.skip(), gr.skip()
        report: dict[str, Any] = yield from ctx.report_job(work)
        new = ctx.add_model(out)
        b = report["bytes"]
        yield (f"wrote **{new.id}** ({b['quantized_file'] / 1e6:.2f} MB, {b['file_ratio']:.3f}x the float file); "
               "it is listed in every model picker (Generate, Compare, Models)", format_report(report),
               to_json(report))

    inputs = [model, output_name, preset, integer, adaln, calib_samples, iters, evaluate, eval_per_class]
    ctx.wire_report_job(quantize, inputs, controls, api_name="quantize")
