"""DiT Studio in the browser: `python -m ui` (or `dit-studio`, or `python ui/app.py`).

    python -m ui [--host 127.0.0.1] [--port N] [--share] [--auth user:pass] [--models-dir DIR] [--outputs-dir DIR]

Binds to 127.0.0.1 unless told otherwise; `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` are honoured when
the flags are absent; a public share link only with `--share`. Tabs come from `ui.tabs.TABS`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # `python ui/app.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "ui"

import gradio as gr

from .context import Studio
from .tabs import TABS

# small digits stay crisp when enlarged
CSS = """.studio-status {font-family: monospace}
#gen-gallery img, #cmp-grids img, .pixelated img {image-rendering: pixelated}
#bench-plots .thumbnail-item {aspect-ratio: 16 / 9}"""


def build_demo(ctx: Studio | None = None, tabs: list[str] | None = None) -> gr.Blocks:
    """The whole page (not launched). `tabs` restricts it to some of `ui.tabs.TABS` (tests)."""
    ctx = ctx or Studio()
    with gr.Blocks(title="DiT Studio") as demo:
        with gr.Row():
            gr.Markdown(f"# DiT Studio\nModels: `{ctx.models_dir}` · outputs: `{ctx.outputs_dir}` · "
                        "one job runs at a time; queued jobs show their position.")
            rescan = gr.Button("Rescan models", size="sm", scale=0, min_width=140)
        for name in (tabs or TABS):
            try:
                module = importlib.import_module(f"ui.tabs.{name}")
            except Exception as err:  # a broken tab must not take the others down
                with gr.Tab(name):
                    gr.Markdown(f"**This tab failed to load:** `{type(err).__name__}: {err}`")
                traceback.print_exc()
                continue
            with gr.Tab(module.TITLE, id=name):
                module.build(ctx)
        ctx.wire_model_refresh(demo, rescan)
        _api_only_endpoints(ctx)
    demo.studio = ctx  # type: ignore[attr-defined]
    return demo


def _api_only_endpoints(ctx: Studio) -> None:
    def list_models(rescan: bool = False) -> list[dict[str, str]]:
        """Every model the studio can load: id (pass it as `model`), kind and location (folder or file)."""
        return [{"id": m.id, "kind": m.kind, "location": str(m.path)} for m in ctx.list_models(rescan)]

    gr.api(list_models, api_name="list_models")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ui", description="DiT Studio web UI (Gradio).")
    p.add_argument("--host", default=None, help="address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1); "
                                                 "0.0.0.0 exposes the studio to your network")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or the first free "
                                                          "from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--models-dir", default="models", help="folder scanned for checkpoints; new models go here")
    p.add_argument("--outputs-dir", default="outputs", help="generated images, comparisons, runs, benchmarks")
    from dit.compile import add_compile_argument

    add_compile_argument(p)  # --compile [MODE]: every model the studio loads runs compiled blocks
    return p


def launch_kwargs(args: argparse.Namespace, ctx: Studio) -> dict[str, Any]:
    auth = None
    if args.auth:
        if ":" not in args.auth:
            raise SystemExit("error: --auth takes USER:PASS")
        auth = tuple(args.auth.split(":", 1))
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = args.port or (int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None)
    return dict(server_name=host, server_port=port, share=bool(args.share), auth=auth,
                allowed_paths=[str(ctx.outputs_dir)], css=CSS, footer_links=["api", "gradio", "settings"])


def free_port(ports: Iterable[int] = range(7860, 7880), host: str = "127.0.0.1") -> int | None:
    """The first port of `ports` that can be bound on `host` now (None if none)."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    return None


def launch(argv: list[str] | None = None, **extra: Any) -> tuple[gr.Blocks, Any]:
    """Parse flags, build and launch; returns (demo, launch() result). `extra` goes to `launch()` (tests)."""
    args = build_parser().parse_args(argv)
    ctx = Studio(args.models_dir, args.outputs_dir, compile_mode=args.compile)
    demo = build_demo(ctx)
    demo.queue(default_concurrency_limit=1)
    result = demo.launch(**{**launch_kwargs(args, ctx), **extra})
    return demo, result


def main(argv: list[str] | None = None) -> None:
    launch(argv)


if __name__ == "__main__":
    main()
