"""The studio's tabs, registered in ONE place: `TABS` below (order = order on the page).

Adding a tab (quantization, grafting, ...) touches only this list and your own module:

1. Write `ui/tabs/<name>.py` defining
   - `TITLE: str` -- the tab's label, e.g. `"Quantize"`;
   - `build(ctx: ui.context.Studio) -> None` -- called inside `with gr.Tab(TITLE):` while the page's
     `gr.Blocks` is open; it creates the components and wires the events of the tab. Import Gradio
     and heavy libraries inside the module, never call `launch()`.
2. Append `"<name>"` to `TABS`. A module that fails to import is reported in the page (the other tabs
   keep working) and by `tests/test_ui.py`.

What the shared context `ctx` (a `ui.context.Studio`) offers -- use it, don't re-implement it:

- `ctx.models_dir`, `ctx.outputs_dir`: `Path`s chosen with `--models-dir/--outputs-dir`. Write new models
  under `ctx.models_dir` (e.g. `ctx.models_dir / "my-model-fp8"`), files for download under
  `ctx.outputs_dir / "<tab>"`. `ctx.new_output_dir("quantize")` gives a fresh timestamped folder.
- Models: `ctx.list_models(rescan=False) -> list[ModelEntry]` (`.id`, `.path`, `.kind`, `.label`);
  `ctx.resolve_model(model_id) -> ModelEntry`; `ctx.load_model(model_id, device="auto", dtype="fp32",
  attention_backend=None) -> (DiT, studio_meta, ModelEntry)` (cached by file and mtime; a missing/corrupt
  checkpoint becomes a readable `gr.Error`); `ctx.add_model(path) -> ModelEntry` registers a model you just
  wrote so every tab lists it (open pages pick it up within seconds). Sampling from a tab: build a
  `ui.generation.GenerationRequest.from_form(ctx, model_id, labels, ...)` and call `.run(job)` / `.save()`
  (same checks, PNGs and metadata as the Generate tab).
- `ctx.state`: a dict for per-server state of a tab (it outlives page reloads).
- Model pickers: `ctx.model_dropdown(label="Model", multiselect=False, **kw) -> gr.Dropdown` -- always
  use it: the app refreshes every such dropdown when the list changes. After an event that writes a
  model, call `ctx.models_changed(event)` (`event` = the `.click(...)`/`.then(...)` dependency) so all
  model dropdowns on every tab are refreshed when it finishes.
- Paths typed by users: `ctx.safe_path(text, must_exist=True, write=False) -> Path` resolves the text
  and raises a visible `gr.Error` unless it lies inside the models/outputs dirs (or the bundled
  `checkpoints/` for reading). Never open a user-given path without it.
- The ONE job queue: every event that uses the CPU/GPU must pass `**ctx.queue` (=`concurrency_id="studio-job",
  concurrency_limit=1`), so one job runs at a time and the others see their queue position.
- Long jobs with progress and Stop: `for kind, payload in ctx.stream(work):` runs `work(job)` in a
  worker thread; inside `work`, call `job.report(done, total, desc)` (and `job.report(..., preview=images)`),
  and pass `cancel=job.cancel` to library calls (`dit.pipeline.generate` honours it). The loop yields
  `("progress", JobProgress)` items (at most one per 0.5 s; a silent job repeats its last one every 3 s,
  `total == 0` before the first report) and finally `("result", value)`; an exception in `work` is re-raised
  in the loop. If the Gradio event is cancelled (a Stop button with `cancels=[event]`, or
  `gradio_client`'s `job.cancel()`), the generator is closed and `ctx.stream` sets `job.cancel` and
  waits for the worker, so the queue slot is really free. `ctx.progress_text(p)` formats "step 3/20,
  1.2 s, ETA 4.5 s".
- Errors: raise `gr.Error("what is wrong -- the fix")`; wrap a tab function with `@ctx.errors` to turn
  the library's `ValueError`/`FileNotFoundError`/`CheckpointError` into `gr.Error` with their message.

Named API endpoints (for `gradio_client`): give every event a readable `api_name` (e.g.
`api_name="quantize"`) and give the Python function readable parameter names (they are the API's
parameter names) whose defaults are the components' initial values. An endpoint without a page
component: `gr.api(fn, api_name="name", **ctx.queue)` (typed parameters and return value). Keep names
unique across tabs: generate, compare, list_models, model_info, convert, train_start, train_status,
train_stop, train_resume, bench, reuse_parameters are taken. Tests: `ui.app.build_demo(Studio(tmp_models,
tmp_outputs), tabs=["quantize"])` builds a page with only your tab; `ui.app.free_port()` picks a port.

Extension points inside the existing tabs (adapters): `ui/tabs/generate.py` and `compare.py` build the
keyword arguments of `dit.pipeline.generate` in ONE function each, `generate_kwargs(...)`; add the
adapter choice + strength as components in the marked "extra generation options" block and as
arguments of that function (see the comments there). `ui/tabs/train.py` builds train.py's command line in
`train_command(...)`; add an adapter form in its marked block and its flags there.
"""
from __future__ import annotations

# Order on the page. Quantization adds "quantize", grafting adds "graft" (one line each).
TABS: list[str] = [
    "generate",
    "compare",
    "train",
    "convert",
    "quantize",
    "graft",
    "models",
    "bench",
]

__all__ = ["TABS"]
