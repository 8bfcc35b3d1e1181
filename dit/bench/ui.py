"""The studio UI's overhead: `generate` through the launched Gradio app vs `dit.pipeline.generate`, same job.

    python -m dit.bench ui                      # 10 images of the bundled model, its default sampler
    python -m dit.bench ui --repeats 5 --steps 25

The app is launched in this process on 127.0.0.1 (`launch(prevent_thread_lock=True)`) and called through
`gradio_client` from a separate process (the time of `Client.predict`: queue, streamed progress and x0
previews, PNG writing; row `ui` until the result with its file links arrives, row `ui+download` with
gradio_client also downloading each of the 21 returned files in turn); the direct call is
`dit.pipeline.generate` on the same loaded model with the same labels, seeds and settings (also shown:
plus writing the PNGs as `sample.py` does), run in a worker thread as the UI runs it. Runs are interleaved (UI, direct, UI, ...) so that load from
other processes hits both alike; the headline is the best of the runs, medians are reported too. Two
clocks: wall time, and this process's CPU time over all its threads (the server and the sampling, not the
client; robust to other processes' load, and with `--threads 1` free of OpenMP spin-waiting).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ._common import RESULTS_DIR, machine_info, median, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=10, help="images per job (labels 0..9 cycled)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--port", type=int, default=7879)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from dit.pipeline import generate
    from ui.app import build_demo, free_port
    from ui.context import Studio
    from ui.generation import GenerationRequest

    work = Path(tempfile.mkdtemp(prefix="dit-bench-ui-"))
    ctx = Studio(work / "models", work / "outputs")
    demo = build_demo(ctx, tabs=["generate"]).queue(default_concurrency_limit=1)
    port = free_port(range(args.port, args.port + 20))
    if port is None:
        raise SystemExit(f"no free port in {args.port}..{args.port + 19}")
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                            quiet=True, allowed_paths=[str(ctx.outputs_dir)])
    labels = [str(i % 10) for i in range(args.images)]
    req = GenerationRequest.from_form(ctx, "dit-digits", labels, 1, args.steps or 25, 2.0, "auto", 0, 16)
    if args.steps is None:
        req = GenerationRequest.from_form(ctx, "dit-digits", labels, 1, req.meta["default_steps"],
                                          req.meta["default_cfg_scale"], "auto", 0, 16)
    steps, cfg = req.kwargs["steps"], req.kwargs["cfg_scale"]
    ui_kwargs = dict(model="dit-digits", labels=labels, images_per_label=1, steps=steps, cfg_scale=cfg, seed=0,
                     batch_size=16, api_name="/generate")

    def direct() -> Any:
        # In a worker thread, as the UI runs it: on a busy 2-core machine the main thread's OpenMP pool was
        # measured ~10x slower than a worker thread's for this very call (59.5 s vs 5.7 s), which would
        # credit the UI with a speed-up that has nothing to do with it.
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.setdefault(
            "out", generate(req.model, req.labels, req.seeds, progress=False, **req.kwargs)))
        worker.start()
        worker.join()
        return box["out"]

    def through_ui(kwargs: dict[str, Any], download: bool = True) -> float:
        """One `Client.predict` from a separate client process (its CPU is not the server's); returns its wall s.
        The client connects first, then waits for "go", so only the request itself is timed on both clocks.
        `download=False`: the result (file links) is ready, the client fetches no file (a browser fetches the
        images it shows lazily, in parallel); `True`: gradio_client also downloads every returned file, one by one."""
        script = ("import json, sys, time\nfrom gradio_client import Client\n"
                  f"c = Client({url!r}, verbose=False, download_files={download!r})\n"
                  "print('ready', flush=True)\nsys.stdin.readline()\n"
                  f"t = time.perf_counter(); c.predict(**json.loads({json.dumps(json.dumps(kwargs))}))\n"
                  "print(time.perf_counter() - t, flush=True)\n")
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the gradio_client process did not connect")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seconds = float(proc.stdout.readline())
        proc.wait()
        return seconds

    through_ui(dict(ui_kwargs, steps=1))   # warm-up of both paths (first-call costs)
    direct()
    paths = {"ui": lambda r: through_ui(ui_kwargs, download=False),
             "ui+download": lambda r: through_ui(ui_kwargs), "pipeline": lambda r: direct(),
             "pipeline+save": lambda r: req.save(direct(), work / f"direct-{r}")}
    times: dict[str, dict[str, list[float]]] = {clock: {k: [] for k in paths} for clock in ("wall", "cpu")}
    try:
        for r in range(args.repeats):
            for name, fn in paths.items():
                w0, c0 = time.perf_counter(), time.process_time()
                client_wall = fn(r)
                wall = time.perf_counter() - w0
                times["wall"][name].append(client_wall if name.startswith("ui") else wall)
                times["cpu"][name].append(time.process_time() - c0)   # every thread of this (server) process
    finally:
        demo.close()
    best = {c: {k: min(v) for k, v in t.items()} for c, t in times.items()}
    med = {c: {k: median(v) for k, v in t.items()} for c, t in times.items()}
    overhead = {c: best[c]["ui"] / best[c]["pipeline"] - 1 for c in times}
    print(f"# dit.bench ui: {args.images} images of dit-digits, {req.kwargs['scheduler']} {steps} steps, cfg {cfg}, "
          f"batch 16, CPU, {torch.get_num_threads()} torch threads, {args.repeats} interleaved runs each")
    print()
    print("| path | wall s best (median) | CPU s best (median) | UI vs pipeline, wall | UI vs pipeline, CPU |")
    print("|---|---|---|---|---|")
    for k in paths:
        rel = {c: f"{best[c][k] / best[c]['pipeline'] - 1:+.1%}" for c in times}
        print(f"| {k} | {best['wall'][k]:.2f} ({med['wall'][k]:.2f}) | {best['cpu'][k]:.2f} ({med['cpu'][k]:.2f}) | "
              f"{rel['wall']} | {rel['cpu']} |")
    print()
    print(f"UI overhead (best of runs): wall {overhead['wall']:+.1%}, CPU time {overhead['cpu']:+.1%}; goal <= +10%; "
          f"load average {machine_info()['load_average']}")
    payload = {"benchmark": "ui", "images": args.images, "steps": steps, "cfg_scale": cfg,
               "scheduler": req.kwargs["scheduler"], "threads": torch.get_num_threads(), "times": times,
               "best": best, "median": med, "overhead_best": overhead, "machine": machine_info()}
    print(f"wrote {write_json('ui', payload, args.out)}")
    return 0
