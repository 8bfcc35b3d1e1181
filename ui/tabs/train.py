"""Train tab: a form over train.py's main options; the run is a separate process watched through its folder.

Live loss curve (`metrics.jsonl`), the latest EMA preview grid, the checkpoint list, Stop (train.py saves
a resumable checkpoint at the current step), Resume, and a watch mode for any existing run folder. A finished run's export
(`<models dir>/<run name>`) is added to the model list. API: `train_start`, `train_status`, `train_stop`,
`train_resume`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gradio as gr

from ..context import Studio, to_json
from ..training_runs import RunManager, metrics

TITLE = "Train"


def train_command(data: str, model: str, attention: str, objective: str, max_steps: int, batch_size: int,
                  lr: float, mixed_precision: str, checkpointing_steps: int, sample_every: int, init_from: str | None,
                  output_dir: Path, export_dir: Path, **extra: Any) -> list[str]:
    """train.py's argument list. EXTENSION POINT: flags of later features (e.g. adapter training) arrive in
    `extra` as {"--flag": value}; add their form fields in the marked block of `build`."""
    argv = ["--data", data, "--model", model, "--attention", attention, "--objective", objective,
            "--max-steps", str(int(max_steps)), "--batch-size", str(int(batch_size)), "--lr", str(float(lr)),
            "--mixed-precision", mixed_precision, "--checkpointing-steps", str(int(checkpointing_steps)),
            "--sample-every", str(int(sample_every)), "--log-every", str(max(1, min(50, int(max_steps) // 20))),
            "--output-dir", str(output_dir), "--export-dir", str(export_dir)]
    if init_from:
        argv += ["--init-from", init_from]
    for flag, value in extra.items():
        if value not in (None, "", False):
            argv += [flag] if value is True else [flag, str(value)]
    return argv


def build(ctx: Studio) -> None:
    from dit.attention import attention_names
    from dit.config import preset_names

    runs: RunManager = ctx.state.setdefault("train_runs", RunManager())
    runs_dir = ctx.outputs_dir / "runs"

    def run_folder(run: str) -> Path:
        if not run or not str(run).strip():
            raise gr.Error("no run given: start one, or type a run name / run folder and press Watch")
        text = str(run).strip()
        if "/" not in text and (runs_dir / text).exists():
            return (runs_dir / text).resolve()
        folder = ctx.safe_path(text, base=runs_dir)
        if not folder.is_dir():
            raise gr.Error(f"{text} is not a run folder")
        return folder

    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                data = gr.Textbox("digits", label="Data: 'digits' or an image folder (inside the models/outputs dir)")
                run_name = gr.Textbox("", label="Run name (default: date-time)")
            with gr.Row():
                preset = gr.Dropdown(preset_names(), value="DiT-Digits/4", label="Preset")
                attention = gr.Dropdown(attention_names(), value="softmax", allow_custom_value=True,
                                        label="Attention (or one per block, comma-separated)")
                objective = gr.Radio(["flow", "ddpm"], value="flow", label="Objective")
            with gr.Row():
                max_steps = gr.Number(1000, precision=0, label="Steps")
                batch_size = gr.Number(32, precision=0, label="Batch size")
                lr = gr.Number(4e-4, label="Learning rate")
            with gr.Row():
                mixed = gr.Dropdown(["no", "bf16", "fp16"], value="no", label="Mixed precision")
                ckpt_every = gr.Number(100, precision=0, label="Checkpoint every (steps)")
                sample_every = gr.Number(100, precision=0, label="Preview every (steps, 0: at the end)")
            init_from = ctx.model_dropdown("Init from (optional)", value="")
            # ---- extra training options (EXTENSION POINT): add components here, append them to
            # `extra_inputs`, accept them in `train_start(...)` and pass {"--flag": value} in `extra`.
            with gr.Accordion("Adapter (train only a small adapter on the 'Init from' model)", open=False):
                from dit.adapters import TARGET_GROUPS, adapter_kind_names

                with gr.Row():
                    adapter_kind = gr.Dropdown(["none", *adapter_kind_names()], value="none", label="Adapter kind",
                                               elem_id="train-adapter-kind")
                    adapter_rank = gr.Number(4, precision=0, minimum=1, label="Adapter rank")
                    adapter_targets = gr.Dropdown(list(TARGET_GROUPS), value=["attn"], multiselect=True,
                                                  label="Adapted layers")
            compile_blocks = gr.Checkbox(False, label="torch.compile the transformer blocks (--compile: faster "
                                               "steps on a GPU after a short first-step compile)")
            extra_inputs: list[gr.components.Component] = [adapter_kind, adapter_rank, adapter_targets,
                                                           compile_blocks]
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                stop = gr.Button("Stop", variant="stop")
                resume = gr.Button("Resume")
            with gr.Row():
                run = gr.Textbox("", label="Run (name under outputs/runs, or a run folder)", scale=3)
                watch = gr.Button("Watch", scale=1)
        with gr.Column(scale=3):
            status = gr.Markdown(label="status", elem_classes=["studio-status"])
            curve = gr.LinePlot(x="step", y="loss", title="training loss", height=260)
            with gr.Row():
                preview = gr.Image(label="Latest EMA preview", type="filepath", interactive=False, height=260,
                                   elem_classes=["pixelated"])
                checkpoints = gr.JSON(label="Checkpoints (resumable)")
            log = gr.Textbox(label="train.log (tail)", lines=12, max_lines=12, autoscroll=True)

    @ctx.errors
    def train_start(data: str = "digits", model: str = "DiT-Digits/4", attention: str = "softmax",
                    objective: str = "flow", max_steps: int = 1000, batch_size: int = 32, lr: float = 4e-4,
                    mixed_precision: str = "no", checkpointing_steps: int = 100, sample_every: int = 100,
                    init_from: str = "", run_name: str = "", adapter: str = "none", adapter_rank: int = 4,
                    adapter_targets: list[str] | None = None, compile: bool = False) -> tuple[str, dict[str, Any]]:
        """Start `train.py` in its own process; returns (run name, status). The export goes to the models dir."""
        import time

        for name, value in (("steps", max_steps), ("batch size", batch_size),
                            ("checkpoint interval", checkpointing_steps)):
            if value is None or int(value) < 1:
                raise gr.Error(f"{name} must be at least 1 (got {value})")
        if lr is None or not 0 < float(lr) < 1:
            raise gr.Error(f"learning rate must be in (0, 1) (got {lr})")
        if model not in preset_names():
            raise gr.Error(f"unknown preset {model!r}; choose one of {', '.join(preset_names())}")
        if objective not in ("flow", "ddpm"):
            raise gr.Error("objective must be flow or ddpm")
        for a in str(attention).split(","):
            if a.strip() not in attention_names():
                raise gr.Error(f"unknown attention {a!r}; choose from {', '.join(attention_names())}")
        data_arg = data.strip() if data.strip() in ("digits", "digits-inverted") else str(ctx.safe_path(data))
        name = (run_name or "").strip() or time.strftime("run-%Y%m%d-%H%M%S")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise gr.Error(f"run name {name!r}: use letters, digits, '-', '_', '.'")
        folder, export = runs_dir / name, ctx.models_dir / name
        if folder.exists():
            raise gr.Error(f"run {name!r} already exists ({folder}); press Resume to continue it, or pick a new name")
        if export.exists():
            raise gr.Error(f"{export} already exists; pick another run name (nothing is overwritten)")
        init = str(ctx.resolve_model(init_from).path) if init_from else None
        from ..adapters import adapter_train_flags

        extra: dict[str, Any] = adapter_train_flags(adapter, adapter_rank, adapter_targets)
        if extra and not init_from:
            raise gr.Error("adapter training needs a base model: choose it in 'Init from'")
        if compile:
            extra["--compile"] = True
        argv = train_command(data_arg, model, attention, objective, max_steps, batch_size, lr, mixed_precision,
                             checkpointing_steps, sample_every, init, folder, export, **extra)
        runs.start(folder, argv, export)
        return name, runs.status(folder).as_dict()

    @ctx.errors
    def train_status(run: str = "") -> dict[str, Any]:
        """State (running/finished/failed/stopped), step, last loss, checkpoints, preview, export of a run.
        A finished run's export is added to the model list."""
        folder = run_folder(run)
        s = runs.status(folder)
        if s.export and not any(str(m.path) == s.export for m in ctx.list_models()):
            ctx.add_model(s.export)
        d = s.as_dict()
        d["export_model_id"] = next((m.id for m in ctx.list_models() if str(m.path) == s.export), None)
        return to_json(d)

    @ctx.errors
    def train_stop(run: str = "") -> dict[str, Any]:
        """Stop a running run; its last checkpoint stays resumable (Resume / --resume-from latest)."""
        folder = run_folder(run)
        if not runs.stop(folder):
            raise gr.Error(f"run {folder.name!r} is not running")
        return train_status(str(folder))

    @ctx.errors
    def train_resume(run: str = "") -> dict[str, Any]:
        """Continue a stopped run from its latest checkpoint with the same settings."""
        folder = run_folder(run)
        if runs.running(folder):
            raise gr.Error(f"run {folder.name!r} is already running")
        rec = runs.record(folder)
        if not rec.get("argv"):
            raise gr.Error(f"{folder} was not started from the studio (no ui_run.json): resume it with "
                           f"`python train.py ... --output-dir {folder} --resume-from latest`")
        runs.start(folder, rec["argv"], Path(rec["export"]), resume=True)
        return train_status(str(folder))

    def view(run: str) -> tuple[Any, ...]:
        """Page view of a run (for the timer: never raises)."""
        import pandas as pd

        if not run or not str(run).strip():
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            folder = run_folder(run)
            s = runs.status(folder)
            if s.export and not any(str(m.path) == s.export for m in ctx.list_models()):
                ctx.add_model(s.export)   # the finished run's model appears in every model list
        except gr.Error as err:
            return str(err), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        pts = metrics(folder)
        df = pd.DataFrame({"step": [p["step"] for p in pts], "loss": [p["loss"] for p in pts]})
        text = (f"**{s.run}**: {s.state}, step {s.step}/{s.max_steps or '?'}"
                + (f", loss {s.loss:.4f}" if s.loss is not None else "")
                + (f" · export: `{s.export}`" if s.export else "")
                + (f"\n\n**Error:** {s.error}" if s.error else ""))
        return text, df, s.preview, s.checkpoints, s.log_tail

    view_outputs = [status, curve, preview, checkpoints, log]
    form = [data, preset, attention, objective, max_steps, batch_size, lr, mixed, ckpt_every, sample_every,
            init_from, run_name, *extra_inputs]
    started = start.click(train_start, form, [run, gr.JSON(visible=False)], api_name="train_start")
    started.then(view, run, view_outputs, api_visibility="private")
    ctx.models_changed(started)
    stop.click(train_stop, run, gr.JSON(visible=False), api_name="train_stop").then(
        view, run, view_outputs, api_visibility="private")
    resume.click(train_resume, run, gr.JSON(visible=False), api_name="train_resume").then(
        view, run, view_outputs, api_visibility="private")
    watch.click(view, run, view_outputs, api_visibility="private")
    gr.api(train_status, api_name="train_status")
    timer = gr.Timer(2.0)
    timer.tick(view, run, view_outputs, api_visibility="private", queue=False, show_progress="hidden")
