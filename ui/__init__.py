"""DiT Studio's Gradio UI: `python -m ui`. `build_demo(Studio(...))` builds the page without launching it."""
from __future__ import annotations

__all__ = ["build_demo", "main", "Studio"]


def __getattr__(name: str):  # import gradio only when the UI is used
    if name in ("build_demo", "main"):
        from . import app

        return getattr(app, name)
    if name == "Studio":
        from .context import Studio

        return Studio
    raise AttributeError(name)
