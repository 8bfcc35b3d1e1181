"""Benchmarks tab: `python -m dit.bench forward --quick` and `dit.bench attention --quick` as one queued job.

Each benchmark runs in its own process (as from the CLI; its timings are not disturbed by the server's
threads), its log streams into the page, Stop kills it, and its JSON tables and PNG plots are shown.
API: `bench`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from ..context import Job, Studio, to_json

TITLE = "Benchmarks"
FORWARD_COLUMNS = ["batch", "studio_ms", "diffusers_ms", "studio_gflops", "diffusers_gflops", "speedup",
                   "ceiling_gflops", "studio_pct_of_ceiling"]
ATTENTION_COLUMNS = ["scope", "variant", "tokens", "latency_ms", "peak_mb", "flops"]


def run_logged(cmd: list[str], job: Job, log: list[str], step: int, total: int) -> int:
    """Run `cmd`, appending its output lines to `log`; kill it when the job is cancelled."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            job.report(step, total, line.strip()[:80])
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        if job.cancel.wait(0.2):
            proc.kill()
            proc.wait()
            from dit.schedulers import GenerationCancelled

            raise GenerationCancelled(f"benchmark stopped: {' '.join(cmd[2:])}")
    reader.join(timeout=5)
    return proc.returncode


def rows_table(rows: list[dict[str, Any]], columns: list[str]) -> list[list[Any]]:
    def fmt(v: Any) -> Any:
        return round(v, 3) if isinstance(v, float) else v
    return [[fmt(r.get(c)) for c in columns] for r in rows]


def load_results(out: Path) -> tuple[list[list[Any]], list[list[Any]], list[tuple[str, str]], dict[str, Any]]:
    """The tables, plots and JSON payload of one benchmark folder (what a run writes)."""
    payload: dict[str, Any] = {"folder": str(out)}
    fwd: list[list[Any]] = []
    att: list[list[Any]] = []
    if (out / "forward.json").exists():
        payload["forward"] = json.loads((out / "forward.json").read_text())
        fwd = rows_table(payload["forward"]["forward"], FORWARD_COLUMNS)
    if (out / "attention.json").exists():
        payload["attention"] = json.loads((out / "attention.json").read_text())
        att = rows_table(payload["attention"]["rows"], ATTENTION_COLUMNS)
    pngs = [(str(p), p.stem) for p in sorted(Path(out).glob("*.png"))]
    return fwd, att, pngs, payload


def latest_folder(ctx: Studio) -> Path | None:
    """The newest folder of this tab's runs (outputs/bench/<date-time>) holding results, if any."""
    runs = sorted((ctx.outputs_dir / "bench").glob("*"), reverse=True) if (ctx.outputs_dir / "bench").is_dir() else []
    for folder in runs:
        if (folder / "forward.json").exists() or (folder / "attention.json").exists():
            return folder
    return None


def build(ctx: Studio) -> None:
    from dit.config import preset_names

    with gr.Row():
        which = gr.Radio(["forward", "attention", "both"], value="both", label="Benchmarks")
        model = gr.Dropdown(preset_names(), value="DiT-S/2", label="forward: model preset")
        quick = gr.Checkbox(True, label="quick (smoke-run settings)")
    with gr.Row():
        go = gr.Button("Run benchmarks", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    def shown() -> tuple[list[list[Any]], list[list[Any]], list[tuple[str, str]], str]:
        """What the page opens with: the newest results on disk, or how to make some."""
        folder = latest_folder(ctx)
        if folder is None:
            return [], [], [], ("No benchmark results yet: **Run benchmarks** (quick settings take about a minute "
                                "on a laptop CPU); the measured tables are also in bench/README.md.")
        fwd, att, pngs, _ = load_results(folder)
        return fwd, att, pngs, f"latest results: `{folder}` (Run benchmarks for new ones)"

    status = gr.Markdown(lambda: shown()[3], label="status", elem_classes=["studio-status"])
    forward_table = gr.Dataframe(lambda: shown()[0], headers=FORWARD_COLUMNS,
                                 label="forward: studio vs diffusers (fp32)", interactive=False)
    attention_table = gr.Dataframe(lambda: shown()[1], headers=ATTENTION_COLUMNS,
                                   label="attention: latency and memory per variant", interactive=False)
    plots = gr.Gallery(lambda: shown()[2], label="Plots (click to enlarge)", columns=2, height=520,
                       object_fit="contain", interactive=False, elem_id="bench-plots")
    log_box = gr.Textbox(label="log", lines=8, max_lines=20)
    results = gr.JSON(visible=False)

    @ctx.errors
    def bench(which: str = "both", model: str = "DiT-S/2", quick: bool = True, progress: gr.Progress = gr.Progress()):
        """Run the forward and/or attention benchmark; returns (forward table, attention table, plots, log, JSON, status)."""
        if which not in ("forward", "attention", "both"):
            raise gr.Error(f"which must be forward, attention or both (got {which!r})")
        if model not in preset_names():
            raise gr.Error(f"unknown preset {model!r}; choose one of {', '.join(preset_names())}")
        out = ctx.new_output_dir("bench")
        cmds = []
        if which in ("forward", "both"):
            cmds.append([sys.executable, "-m", "dit.bench", "forward", "--model", model, "--out", str(out)]
                        + (["--quick"] if quick else []))
        if which in ("attention", "both"):
            cmds.append([sys.executable, "-m", "dit.bench", "attention", "--output", str(out)]
                        + (["--quick"] if quick else []))
        log: list[str] = []

        def work(job: Job) -> None:
            for i, cmd in enumerate(cmds):
                log.append("$ python " + " ".join(cmd[1:]))
                code = run_logged(cmd, job, log, i, len(cmds))
                if code != 0:
                    raise gr.Error(f"`python {' '.join(cmd[1:])}` failed (exit {code}): {' / '.join(log[-3:])}")
                job.report(i + 1, len(cmds), "done")

        for kind, value in ctx.stream(work):
            if kind == "progress":
                if value.total > 0:
                    progress((value.done, value.total), desc=value.desc)
                text = ctx.progress_text(value).lstrip("# ")  # a "# ..." log line must not become a heading
                yield gr.skip(), gr.skip(), gr.skip(), "\n".join(log[-20:]), gr.skip(), text
        fwd, att, pngs, payload = load_results(out)
        yield fwd, att, pngs, "\n".join(log[-40:]), to_json(payload), f"done -> `{out}`"

    event = go.click(bench, [which, model, quick], [forward_table, attention_table, plots, log_box, results, status],
                     api_name="bench", **ctx.queue)
    stop.click(None, None, None, cancels=[event], api_visibility="private")
