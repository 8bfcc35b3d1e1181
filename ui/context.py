"""`Studio`: what every tab shares -- folders, the model list, safe paths, the one job queue, long jobs.

The contract for tab authors is in `ui/tabs/__init__.py`. One `Studio` lives as long as the server, so
state kept here (loaded models, training processes) outlives a page reload.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import queue
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from .models import ModelEntry, scan_models

log = logging.getLogger("ui")

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_MODEL_ID = "dit-digits"
JOB_QUEUE = "studio-job"


@dataclass
class JobProgress:
    """One progress report of a long job (`done` of `total` units, with an estimate of the time left)."""

    done: int
    total: int
    desc: str = ""
    elapsed: float = 0.0
    preview: list[Any] | None = None

    @property
    def eta(self) -> float | None:
        if self.done <= 0 or self.total <= 0:
            return None
        return self.elapsed / self.done * max(0, self.total - self.done)


class Job:
    """Handle given to the `work` function of `Studio.stream`: report progress, honour `cancel`."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        self._queue: queue.Queue = queue.Queue()

    def report(self, done: int, total: int, desc: str = "", preview: list[Any] | None = None) -> None:
        self._queue.put(JobProgress(done, total, desc, time.perf_counter() - self.started, preview))


_DONE = object()


class Studio:
    """The shared context handed to every tab's `build(ctx)` (see `ui/tabs/__init__.py`)."""

    queue: dict[str, Any] = {"concurrency_id": JOB_QUEUE, "concurrency_limit": 1}

    def __init__(self, models_dir: str | Path = "models", outputs_dir: str | Path = "outputs",
                 include_bundled: bool = True, max_loaded: int = 4, compile_mode: str | None = None):
        self.models_dir = Path(models_dir).expanduser().resolve()
        self.outputs_dir = Path(outputs_dir).expanduser().resolve()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.include_bundled = include_bundled and BUNDLED_DIR.is_dir()
        self._models: list[ModelEntry] | None = None
        self.models_version = 0   # bumped whenever the list changes; open pages poll it
        self._extra: dict[str, ModelEntry] = {}
        self._loaded: OrderedDict[tuple, tuple[Any, dict[str, Any]]] = OrderedDict()
        self._max_loaded = max_loaded
        self.compile_mode = compile_mode  # `python -m ui --compile [MODE]`: loaded models' blocks are compiled
        self._lock = threading.RLock()
        self._dropdowns: list[tuple[gr.Dropdown, bool]] = []
        self._change_events: list[Any] = []
        self.state: dict[str, Any] = {}   # per-server state of tabs (e.g. the training runs)

    # ------------------------------------------------------------------ paths
    @property
    def read_roots(self) -> list[Path]:
        roots = [self.models_dir, self.outputs_dir]
        if self.include_bundled:
            roots.append(BUNDLED_DIR.resolve())
        return roots

    @property
    def write_roots(self) -> list[Path]:
        return [self.models_dir, self.outputs_dir]

    def safe_path(self, text: str | Path, must_exist: bool = True, write: bool = False,
                  base: Path | None = None) -> Path:
        """Resolve a user-typed path; a visible `gr.Error` unless it lies inside the allowed folders.

        Relative paths are taken relative to `base` (default: the models dir)."""
        if text is None or not str(text).strip():
            raise gr.Error("no path given")
        path = Path(str(text).strip()).expanduser()
        if not path.is_absolute():
            path = (base or self.models_dir) / path
        path = path.resolve()
        roots = self.write_roots if write else self.read_roots
        if not any(path == r or path.is_relative_to(r) for r in roots):
            raise gr.Error(f"{text} is outside the folders this studio may {'write' if write else 'read'} "
                           f"({', '.join(str(r) for r in roots)}). Fix: move it there, or start the studio "
                           "with --models-dir / --outputs-dir pointing at its folder.")
        if must_exist and not path.exists():
            raise gr.Error(f"{text} does not exist (looked for {path})")
        return path

    def new_output_dir(self, kind: str) -> Path:
        """A fresh folder `outputs/<kind>/<date>-<time>[-n]` (never an existing one)."""
        base = self.outputs_dir / kind
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            folder = base / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                folder.mkdir(parents=True, exist_ok=False)
                return folder
            except FileExistsError:
                continue
        raise gr.Error(f"cannot make a new folder under {base}")

    # ------------------------------------------------------------------ models
    def list_models(self, rescan: bool = False) -> list[ModelEntry]:
        with self._lock:
            if self._models is None or rescan:
                found = scan_models(self.models_dir, BUNDLED_DIR if self.include_bundled else None)
                seen = {m.path for m in found}
                found += [m for m in self._extra.values() if m.path not in seen and m.path.exists()]
                if self._models is not None and [m.id for m in found] != [m.id for m in self._models]:
                    self.models_version += 1
                self._models = found
            return list(self._models)

    def model_choices(self, rescan: bool = False) -> list[tuple[str, str]]:
        return [(m.label, m.id) for m in self.list_models(rescan)]

    @property
    def default_model_id(self) -> str | None:
        ids = [m.id for m in self.list_models()]
        return DEFAULT_MODEL_ID if DEFAULT_MODEL_ID in ids else (ids[0] if ids else None)

    def resolve_model(self, model_id: str | None) -> ModelEntry:
        model_id = (model_id or "").strip() or self.default_model_id
        if model_id is None:
            raise gr.Error(f"no models found: put a checkpoint folder under {self.models_dir} and press Rescan")
        for m in self.list_models():
            if m.id == model_id or m.label == model_id:
                return m
        for m in self.list_models(rescan=True):
            if m.id == model_id:
                return m
        known = ", ".join(m.id for m in self.list_models())
        raise gr.Error(f"unknown model {model_id!r}; known models: {known}. Fix: pick one of them, or add the "
                       f"checkpoint under {self.models_dir} and rescan")

    def add_model(self, path: str | Path) -> ModelEntry:
        """Register a model folder/file just written (inside the models or outputs dir); returns its entry."""
        path = self.safe_path(path)
        entries = scan_models(path.parent, None, only=path, id_base=self._id_base(path))
        if not entries:
            raise gr.Error(f"{path} is not a model this studio can load (no DiT config.json or .pt)")
        with self._lock:
            self._extra[entries[0].id] = entries[0]
            self._models = None
            self.models_version += 1
        return self.resolve_model(entries[0].id)

    def _id_base(self, path: Path) -> Path:
        for root in (self.models_dir, self.outputs_dir):
            if path.is_relative_to(root):
                return root
        return path.parent

    def load_model(self, model_id: str | None, device: Any = "auto", dtype: Any = "fp32",
                   attention_backend: str | None = None) -> tuple[Any, dict[str, Any], ModelEntry]:
        """(model, studio_meta, entry), cached by file and modification time; errors become `gr.Error`."""
        from dit.convert import load_any
        from dit.pipeline import cast_model, resolve_device, resolve_dtype

        entry = self.resolve_model(model_id)
        try:
            dev = resolve_device(device or "auto")
            dt = resolve_dtype(dtype or "fp32", dev)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        key = (str(entry.path), entry.mtime(), str(dev), str(dt))
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
        if hit is None:
            try:
                model, meta = load_any(entry.path, device=dev, dtype=dt)
            except Exception as err:  # corrupt or unreadable checkpoints of every kind
                raise gr.Error(f"cannot load model {entry.id!r} from {entry.path}: {err}") from None
            if self.compile_mode:  # regional and lazy: the first generation of each batch shape compiles
                from dit.compile import compile_model

                compile_model(model, self.compile_mode)
            with self._lock:
                self._loaded[key] = (model, meta)
                while len(self._loaded) > self._max_loaded:
                    self._loaded.popitem(last=False)
        else:
            model, meta = hit
        model = cast_model(model, dev, dt)
        try:
            model.set_attention_backend(attention_backend or model.config.attention_backend or "sdpa")
        except (ValueError, RuntimeError) as err:
            raise gr.Error(f"attention backend {attention_backend!r}: {err}") from None
        return model, dict(meta), entry

    # ------------------------------------------------------------------ model dropdowns
    def model_dropdown(self, label: str = "Model", multiselect: bool = False, **kwargs: Any) -> gr.Dropdown:
        """A model picker that the app refreshes whenever the model list changes."""
        choices = self.model_choices()
        value = kwargs.pop("value", None)
        if value is None:
            value = [] if multiselect else self.default_model_id
        dd = gr.Dropdown(choices=choices, value=value, label=label, multiselect=multiselect,
                         allow_custom_value=True, **kwargs)  # models added later must pass API validation
        self._dropdowns.append((dd, multiselect))
        return dd

    @staticmethod
    def report_job_controls(run_label: str) -> tuple[gr.Button, gr.Button, gr.Markdown, gr.Markdown, gr.JSON]:
        """Run / Stop buttons, a status line and the report (Markdown + hidden JSON) of a model-making job tab."""
        with gr.Row():
            go = gr.Button(run_label, variant="primary")
            stop = gr.Button("Stop", variant="stop")
        status = gr.Markdown()
        report_md = gr.Markdown(label="Report")
        report_json = gr.JSON(label="Report (JSON)", visible=False)
        return go, stop, status, report_md, report_json

    def report_job(self, work: Callable[[Job], Any]) -> Any:
        """`yield from` this in a (status, report, JSON) handler: streams the progress line, returns the report."""
        report: Any = {}
        for kind, value in self.stream(work):
            if kind == "progress":
                yield self.progress_text(value), gr.skip(), gr.skip()
            else:
                report = value
        return report

    def wire_report_job(self, fn: Callable[..., Any], inputs: list[Any], controls: tuple[Any, ...],
                        api_name: str) -> Any:
        """Queue `fn` on the Run button (the shared job queue, a named API endpoint), Stop cancels it, and the
        model pickers refresh when it ends. Returns the event."""
        go, stop, *outputs = controls
        event = go.click(fn, inputs, outputs, api_name=api_name, **self.queue)
        self.models_changed(event)
        stop.click(None, None, None, cancels=[event], api_visibility="private")
        return event

    def models_changed(self, event: Any) -> None:
        """After `event` finishes, rescan and refresh every model dropdown (wired when the page is built)."""
        self._change_events.append(event)

    def dropdown_updates(self) -> list[Any]:
        choices = self.model_choices(rescan=True)
        return [gr.Dropdown(choices=choices) for _ in self._dropdowns]

    def wire_model_refresh(self, demo: gr.Blocks, rescan_button: gr.Button | None = None) -> None:
        outputs = [dd for dd, _ in self._dropdowns]
        if not outputs:
            return
        for event in self._change_events:
            event.then(self.dropdown_updates, None, outputs, api_visibility="private")
        if rescan_button is not None:
            rescan_button.click(self.dropdown_updates, None, outputs, api_visibility="private")
        demo.load(self.dropdown_updates, None, outputs, api_visibility="private")
        # a model added anywhere (a finished training run, a conversion) shows up in open pages within seconds
        seen = gr.State(self.models_version)

        def poll(version: int) -> list[Any]:
            if version == self.models_version:
                return [gr.skip()] * (len(outputs) + 1)
            return [self.models_version, *self.dropdown_updates()]
        gr.Timer(3.0).tick(poll, seen, [seen, *outputs], api_visibility="private", queue=False,
                           show_progress="hidden")

    # ------------------------------------------------------------------ long jobs
    def stream(self, work: Callable[[Job], Any], poll: float = 0.5,
               heartbeat: float = 3.0) -> Iterator[tuple[str, Any]]:
        """Run `work(job)` in a worker thread; yield ("progress", JobProgress) then ("result", value).

        Progress is coalesced to at most one item per `poll` seconds (the newest, keeping the newest preview);
        a silent job still yields its last progress every `heartbeat` seconds, so that Gradio can close the
        generator promptly. Closing it (a cancelled event) sets `job.cancel` and waits for the worker."""
        job = Job()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = work(job)
            except BaseException as err:  # re-raised in the consumer
                box["error"] = err
            finally:
                job._queue.put(_DONE)

        worker = threading.Thread(target=run, name="studio-job", daemon=True)
        worker.start()
        finished = False
        last: JobProgress | None = None
        try:
            while not finished:
                try:
                    item = job._queue.get(timeout=heartbeat)
                except queue.Empty:
                    elapsed = time.perf_counter() - job.started
                    yield "progress", (JobProgress(last.done, last.total, last.desc, elapsed) if last
                                       else JobProgress(0, 0, "working", elapsed))
                    continue
                latest, preview = None, None
                deadline = time.perf_counter() + poll
                while True:
                    if item is _DONE:
                        finished = True
                        break
                    latest = item
                    preview = item.preview or preview
                    timeout = deadline - time.perf_counter()
                    if timeout <= 0:
                        break
                    try:
                        item = job._queue.get(timeout=timeout)
                    except queue.Empty:
                        break
                if latest is not None:
                    latest.preview = preview
                    last = latest
                    yield "progress", latest
            if "error" in box:
                raise box["error"]
            yield "result", box.get("value")
        finally:
            job.cancel.set()
            worker.join(timeout=30)

    @staticmethod
    def progress_text(p: JobProgress) -> str:
        eta = p.eta
        if p.total <= 0:
            return f"{p.desc or 'working'}: {p.elapsed:.1f} s"
        text = f"{p.desc + ': ' if p.desc else ''}step {p.done}/{p.total}, {p.elapsed:.1f} s"
        return text + (f", ETA {eta:.1f} s" if eta is not None else "")

    # ------------------------------------------------------------------ errors
    @staticmethod
    def errors(fn: Callable) -> Callable:
        """Turn library errors into `gr.Error` (a readable message in the page, never a stack trace)."""
        def convert(err: BaseException) -> BaseException:
            from dit.schedulers import GenerationCancelled

            if isinstance(err, gr.Error):
                return err
            if isinstance(err, GenerationCancelled):
                return gr.Error(f"stopped: {err}")
            if isinstance(err, (ValueError, FileNotFoundError, KeyError, FileExistsError, PermissionError)):
                return gr.Error(str(err).strip("'\""))
            log.error("unexpected error in %s:\n%s", fn.__name__, "".join(traceback.format_exception(err)))
            return gr.Error(f"{type(err).__name__}: {err}")

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                try:
                    yield from fn(*args, **kwargs)
                except GeneratorExit:
                    raise
                except Exception as err:
                    raise convert(err) from None
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                raise convert(err) from None
        return wrapper


def to_json(obj: Any) -> Any:
    """JSON-safe copy (Paths, tuples, NaN-free) for API outputs."""
    return json.loads(json.dumps(obj, default=str).replace("NaN", "null"))


__all__ = ["Studio", "Job", "JobProgress", "ModelEntry", "JOB_QUEUE", "BUNDLED_DIR", "DEFAULT_MODEL_ID", "to_json"]
