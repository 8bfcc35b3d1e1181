"""Compare tab: the same labels and seeds through 2-6 models -- a grid per model, a table, a time-vs-quality plot.

Per model: seconds per image measured in this run (after a one-step warm-up), GFLOPs per forward and per
image (`dit.flops`, multiply-adds as in the DiT paper; x2 forwards with CFG), parameters, peak memory
(CUDA: `max_memory_allocated`; CPU: the rise of the process's resident memory during sampling, polled
every 5 ms) and, for digits models, the agreement of `dit.eval`'s independent classifier with the
requested labels on exactly the images shown. API: `compare`.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from ..context import Job, Studio, to_json
from ..generation import AUTO, GenerationRequest

TITLE = "Compare"
COLUMNS = ["model", "attention", "scheduler", "s/image", "GFLOPs/forward", "GFLOPs/image", "params (M)",
           "peak memory (MB)", "classifier agreement"]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or the rise of this process's RSS (polled) on CPU."""

    def __init__(self, device: Any):
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = float("nan")

    @staticmethod
    def _rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._rss()
            self._stop = threading.Event()

            def poll() -> None:
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, self._rss())
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, self._rss()) - self._base) / 2**20


def digits_agreement(req: GenerationRequest, images: list[Any]) -> float | None:
    """`dit.eval` classifier agreement on the shown images, or None for a model that is not a digits model."""
    import numpy as np
    import torch
    from dit.eval import EvalError, check_digits_model, evaluate_digit_images

    try:
        check_digits_model(req.model, req.meta)
    except EvalError:
        return None
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))[:, None] / 127.5 - 1
    return float(evaluate_digit_images(x, req.labels)["classifier_agreement"])


def model_row(req: GenerationRequest, seconds: float, peak_mb: float, agreement: float | None) -> dict[str, Any]:
    from dit.flops import model_flops
    from dit.model import count_params

    per_forward = model_flops(req.model)["gflops"]
    forwards = req.kwargs["steps"] * (2 if req.kwargs["cfg_scale"] != 1.0 else 1)
    if req.kwargs["scheduler"] == "heun":
        forwards *= 2
    return {"model": req.entry.id, "attention": str(req.model.config.attention),
            "scheduler": f"{req.kwargs['scheduler']} x{req.kwargs['steps']}",
            "s/image": round(seconds / len(req.labels), 4), "GFLOPs/forward": round(per_forward, 4),
            "GFLOPs/image": round(per_forward * forwards, 3), "params (M)": round(count_params(req.model) / 1e6, 3),
            "peak memory (MB)": round(peak_mb, 1),
            "classifier agreement": None if agreement is None else round(agreement, 3)}


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = all(r["classifier agreement"] is not None for r in rows)
    key = "classifier agreement" if quality else "GFLOPs/image"
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["s/image"], r[key], s=60)
        ax.annotate(r["model"], (r["s/image"], r[key]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("seconds per image (this run)")
    ax.set_ylabel(key + (" (dit.eval classifier)" if quality else ""))
    ax.set_title("time vs quality" if quality else "time vs compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build(ctx: Studio) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            ids = [m.id for m in ctx.list_models()]
            default = [i for i in (ctx.default_model_id, "variants/digits-linear") if i in ids] or ids[:2]
            models = ctx.model_dropdown("Models (2-6)", multiselect=True, value=default)
            labels = gr.Dropdown(choices=[str(i) for i in range(10)], value=[], multiselect=True,
                                 allow_custom_value=True, label="Class labels (empty: one of each class, up to 10)")
            with gr.Row():
                per_label = gr.Number(1, precision=0, minimum=1, label="Images per label")
                steps = gr.Number(25, precision=0, label="Steps", elem_id="cmp-steps")
                cfg = gr.Number(2.0, label="CFG scale")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
            from dit.schedulers import sampler_names
            scheduler = gr.Dropdown([AUTO, *sampler_names()], value=AUTO, allow_custom_value=True,
                                    label="Scheduler (auto: each model's default)")
            # ---- extra generation options (EXTENSION POINT, as in generate.py): add components here,
            # append them to `extra_inputs` and accept them in `compare(...)`, passed on in `extra`.
            from ..adapters import adapter_components

            extra_inputs: list[gr.components.Component] = adapter_components(ctx, "cmp")  # applied to every model
            with gr.Row():
                go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=3):
            status = gr.Markdown("", label="status", elem_classes=["studio-status"])
            grids = gr.Gallery(label="One grid per model", columns=3, height=340, object_fit="contain", format="png",
                               fit_columns=False,
                               interactive=False,
                               elem_id="cmp-grids")
            table = gr.Dataframe(headers=COLUMNS, label="Per model (measured in this run)", interactive=False,
                                 elem_id="cmp-table")
            chart = gr.Image(label="Time vs quality", type="filepath", interactive=False)
            results = gr.JSON(label="Results", visible=False)

    @ctx.errors
    def compare(models: list[str] | None = None, labels: list[str] | None = None, images_per_label: int = 1,
                steps: int = 25, cfg_scale: float = 2.0, seed: int = 0, scheduler: str = AUTO,
                adapter: str = "", adapter_strength: float = 1.0, progress: gr.Progress = gr.Progress()):
        """Sample the same labels and seeds with each model; returns (grids, table, plot, per-model results, status)."""
        models = list(models or [])
        if not 2 <= len(models) <= 6:
            raise gr.Error(f"pick 2 to 6 models to compare (got {len(models)})")
        if len(set(models)) != len(models):
            raise gr.Error("a model is listed twice; pick different models")
        from ..adapters import adapter_extra

        extra: dict[str, Any] = adapter_extra(ctx, adapter, adapter_strength)  # the adapter on every model
        requests = [GenerationRequest.from_form(ctx, m, labels, images_per_label, steps, cfg_scale, scheduler, seed,
                                                16, **extra) for m in models]
        folder = ctx.new_output_dir("compare")

        def work(job: Job) -> list[dict[str, Any]]:
            from dit.pipeline import generate

            out = []
            for k, req in enumerate(requests):
                warm = dict(req.kwargs, steps=1)
                generate(req.model, req.labels[:1], req.seeds[:1], progress=False, **warm)  # one-time costs
                job.report(k, len(requests), f"{req.entry.id}")
                with PeakMemory(next(req.model.parameters()).device) as mem:
                    t0 = time.perf_counter()
                    generated = req.run(job)
                    seconds = time.perf_counter() - t0
                sub = folder / re.sub(r"[^A-Za-z0-9_.-]+", "_", req.entry.id)
                paths = req.save(generated, sub)
                row = model_row(req, seconds, mem.peak_mb, digits_agreement(req, generated.images))
                out.append({"model": req.entry.id, "grid": str(sub / "grid.png"), "files": [str(p) for p in paths],
                            "row": row})
            return out

        for kind, value in ctx.stream(work):
            if kind == "progress":
                if value.total > 0:
                    progress((value.done, value.total), desc=value.desc)
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), ctx.progress_text(value)
            else:
                per_model = value
        rows = [r["row"] for r in per_model]
        (folder / "compare.json").write_text(json.dumps(to_json(per_model), indent=2))
        chart_path = plot(rows, folder / "time_vs_quality.png")
        items = [(r["grid"], r["model"]) for r in per_model]
        yield (items, [[r[c] for c in COLUMNS] for r in rows], str(chart_path), to_json(per_model),
               f"{len(models)} models, {len(requests[0].labels)} image(s) each, same labels and seeds -> `{folder}`")

    inputs = [models, labels, per_label, steps, cfg, seed, scheduler, *extra_inputs]
    event = go.click(compare, inputs, [grids, table, chart, results, status], api_name="compare", **ctx.queue)
    stop.click(None, None, None, cancels=[event], api_visibility="private")
