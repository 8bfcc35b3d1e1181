"""One way for the UI tests to serve a studio: on 127.0.0.1, a free port of the test file's own range (each
file has its own, so files can run side by side), the job queue as `python -m ui` sets it, and a
`gradio_client.Client` for its API; training runs started through it are stopped on exit."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import pytest


@contextlib.contextmanager
def served_studio(ctx, ports: range, tabs: Sequence[str] | None = None) -> Iterator:
    from gradio_client import Client

    from ui.app import build_demo, free_port

    port = free_port(ports)
    if port is None:
        pytest.skip(f"no free port in {ports.start}-{ports.stop - 1}")
    demo = build_demo(ctx, tabs=tabs).queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            allowed_paths=[str(ctx.outputs_dir)])
    try:
        yield Client(url, verbose=False)
    finally:
        runs = ctx.state.get("train_runs")
        for folder in list(runs.procs) if runs is not None else []:
            runs.stop(Path(folder))
        demo.close()
