"""Generate tab: sample a model with live progress, predicted-x0 previews, Stop, and PNGs with metadata.

API: `generate` (a bare call samples one image per class from the default model and returns the PNG
files, with the same names and metadata as `sample.py`) and `reuse_parameters` (a studio PNG -> its settings).
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from ..context import Studio
from ..generation import AUTO, MODEL_BACKEND, GenerationRequest, preview_grid, random_seed

TITLE = "Generate"
BACKENDS = [MODEL_BACKEND, "sdpa", "math", "xformers", "auto"]


def model_defaults(ctx: Studio, model_id: str | None) -> dict[str, Any]:
    """Form values a model implies: its classes, the schedulers of its objective, its sampling defaults."""
    from dit.schedulers import sampler_names

    entry = ctx.resolve_model(model_id)
    if entry.kind == "studio":  # cheap: read the json files, no weights
        import json

        from dit.checkpoint import read_studio_meta

        meta = read_studio_meta(entry.path)
        num_classes = json.loads((entry.path / "config.json").read_text()).get("num_classes", 1000)
    else:
        model, meta, _ = ctx.load_model(model_id)
        num_classes = model.config.num_classes
    names = meta.get("class_names") or [str(i) for i in range(num_classes)]
    return dict(class_choices=[(f"{i}: {n}" if str(n) != str(i) else str(i), str(i)) for i, n in enumerate(names)],
                schedulers=[AUTO] + sampler_names(meta["objective"]), scheduler=meta["default_scheduler"],
                steps=int(meta["default_steps"]), cfg_scale=float(meta["default_cfg_scale"]),
                objective=meta["objective"], num_classes=num_classes)


def build(ctx: Studio) -> None:
    import torch

    d = model_defaults(ctx, ctx.default_model_id) if ctx.default_model_id else dict(
        class_choices=[], schedulers=[AUTO], scheduler=AUTO, steps=25, cfg_scale=4.0, objective="ddpm", num_classes=0)
    gpu = torch.cuda.is_available()
    with gr.Row():
        with gr.Column(scale=2):
            model = ctx.model_dropdown("Model")
            labels = gr.Dropdown(choices=d["class_choices"], value=[], multiselect=True, allow_custom_value=True,
                                 label="Class labels (empty: one of each class, up to 10)",
                                 elem_id="gen-labels")
            with gr.Row():
                per_label = gr.Number(1, precision=0, minimum=1, label="Images per label", elem_id="gen-per-label")
                steps = gr.Number(d["steps"], precision=0, label="Steps", elem_id="gen-steps")
                cfg = gr.Number(d["cfg_scale"], label="CFG scale")
            with gr.Row():
                scheduler = gr.Dropdown(d["schedulers"], value=AUTO, allow_custom_value=True,
                                        label=f"Scheduler ({AUTO}: {d['scheduler']})")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed (image i: seed + i)")
                dice = gr.Button("Random seed", scale=0, min_width=110, size="sm")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    batch = gr.Number(16, precision=0, minimum=1, label="Batch size")
                    device = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", visible=gpu)
                    dtype = gr.Dropdown(["fp32", "bf16", "fp16"], value="fp32", label="dtype", visible=gpu)
                    backend = gr.Dropdown(BACKENDS, value=MODEL_BACKEND, label="Attention backend")
                # ---- extra generation options (EXTENSION POINT) -------------------------------------
                # Add components for later features here (e.g. adapter + strength), append them to
                # `extra_inputs`, and accept them as keyword arguments of `generate` below, passing them
                # on in `extra` -> GenerationRequest.from_form(..., **extra) -> dit.pipeline.generate.
                from ..adapters import adapter_components

                extra_inputs: list[gr.components.Component] = adapter_components(ctx, "gen")  # adapter, strength
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                stop = gr.Button("Stop", variant="stop")
            reuse = gr.File(label="Reuse parameters: drop a studio PNG", file_types=[".png"], type="filepath")
        with gr.Column(scale=3):
            status = gr.Markdown("", label="status", elem_classes=["studio-status"])
            preview = gr.Image(label="Preview (predicted x0 while sampling; final grid)", type="pil",
                               format="png", height=280, interactive=False, elem_classes=["pixelated"])
            gallery = gr.Gallery(label="Images", columns=5, height=360, object_fit="contain", format="png",
                                 fit_columns=False, interactive=False, buttons=["download", "fullscreen"],
                                 elem_id="gen-gallery")
            files = gr.File(label="PNG files (with metadata)", file_count="multiple", interactive=False)

    @ctx.errors
    def generate(model: str = ctx.default_model_id or "", labels: list[str] | None = None, images_per_label: int = 1,
                 steps: int = d["steps"], cfg_scale: float = d["cfg_scale"], scheduler: str = AUTO, seed: int = 0,
                 batch_size: int = 16, device: str = "auto", dtype: str = "fp32",
                 attention_backend: str = MODEL_BACKEND, adapter: str = "", adapter_strength: float = 1.0,
                 progress: gr.Progress = gr.Progress()):
        """Sample `images_per_label` images of each label (empty: one per class) with seeds seed, seed+1, ...;
        returns (final grid, gallery with class/seed captions, PNG files, status)."""
        from ..adapters import adapter_extra

        extra: dict[str, Any] = adapter_extra(ctx, adapter, adapter_strength)  # {"adapters": [(file, strength)]}
        req = GenerationRequest.from_form(ctx, model, labels, images_per_label, steps, cfg_scale, scheduler, seed,
                                          batch_size, device, dtype, attention_backend, **extra)
        yield None, [], [], f"{req.entry.id}: {len(req.labels)} image(s), starting"
        for kind, value in ctx.stream(lambda job: req.run(job)):
            if kind == "progress":
                if value.total > 0:
                    progress((value.done, value.total), desc="sampling")
                shown = preview_grid(value.preview) if value.preview else gr.skip()
                yield shown, gr.skip(), gr.skip(), ctx.progress_text(value)
            else:
                generated = value
        folder = ctx.new_output_dir("generate")
        paths = req.save(generated, folder)
        items = [(str(p), req.caption(i)) for i, p in enumerate(paths)]
        grid = preview_grid(generated.images, ncols=req.grid_cols())
        yield (grid, items, [str(p) for p in paths],
               f"{req.entry.id}: {len(paths)} image(s), {req.kwargs['scheduler']}, {req.kwargs['steps']} steps, "
               f"cfg {req.kwargs['cfg_scale']} -> `{folder}`")

    inputs = [model, labels, per_label, steps, cfg, scheduler, seed, batch, device, dtype, backend, *extra_inputs]
    event = go.click(generate, inputs, [preview, gallery, files, status], api_name="generate", **ctx.queue)
    stop.click(None, None, None, cancels=[event], api_visibility="private")
    dice.click(random_seed, None, seed, api_visibility="private", queue=False)

    @ctx.errors
    def on_model(model_id: str):
        v = model_defaults(ctx, model_id)
        return (gr.Dropdown(choices=v["class_choices"], value=[]),
                gr.Dropdown(choices=v["schedulers"], value=AUTO, label=f"Scheduler ({AUTO}: {v['scheduler']})"),
                v["steps"], v["cfg_scale"])

    model.input(on_model, model, [labels, scheduler, steps, cfg], api_visibility="private")

    @ctx.errors
    def reuse_parameters(png: str) -> tuple[Any, ...]:
        """Settings stored in a studio PNG: model, labels, images per label, steps, cfg, scheduler, seed, dtype."""
        from dit.pipeline import read_png_parameters

        if not png:
            raise gr.Error("no PNG given")
        try:
            p = read_png_parameters(png)
        except ValueError as err:
            raise gr.Error(f"{err}: drop a PNG written by the studio (sample.py or this page)") from None
        except OSError as err:
            raise gr.Error(f"cannot read the dropped file as a PNG: {err}") from None
        ids = {m.id for m in ctx.list_models()}
        names = {m.path.name: m.id for m in ctx.list_models()}
        model_id = p.get("model") if p.get("model") in ids else names.get(p.get("model"), gr.skip())
        return (model_id, [str(p["class_label"])], 1, p["steps"], p["cfg_scale"], p["scheduler"], p["seed"],
                p.get("dtype", "fp32"))

    reuse.upload(reuse_parameters, reuse, [model, labels, per_label, steps, cfg, scheduler, seed, dtype],
                 api_name="reuse_parameters")
