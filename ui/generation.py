"""What the Generate and Compare tabs share: turning form values into one `dit.pipeline.generate` call.

`GenerationRequest.from_form` checks the form (labels, steps, scheduler...) against the model and names
the fix when something is wrong; `request.run(job)` samples with progress, x0 previews and Stop, and
`save()` writes the same PNGs (same names, same metadata) as `sample.py`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
from PIL import Image

from .context import Job, ModelEntry, Studio

AUTO = "auto"            # scheduler: the checkpoint's studio.json default
MODEL_BACKEND = "default"  # attention backend: the one in the checkpoint's config
PREVIEW_SIZE = 256


def default_labels(num_classes: int) -> list[int]:
    """What `sample.py` samples without --labels: one per class up to 10 (the original DiT demo classes for ImageNet)."""
    from dit.cli.sample import IMAGENET_DEMO_LABELS

    return list(IMAGENET_DEMO_LABELS) if num_classes == 1000 else list(range(min(num_classes, 10)))


def parse_labels(labels: Any, num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Class ids from a list of ids/names or a string "3, 7"; empty -> `default_labels`; out of range -> gr.Error."""
    if labels is None or labels == "" or labels == []:
        return default_labels(num_classes)
    if isinstance(labels, (str, int, float)):
        labels = [x for x in str(labels).replace(",", " ").split()]
    names = {str(n): i for i, n in enumerate(class_names or [])}
    out = []
    for item in labels:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            out.append(int(text))
        elif text in names:
            out.append(names[text])
        else:
            raise gr.Error(f"class label {text!r} is neither a class id nor a class name of this model")
    bad = sorted({y for y in out if not 0 <= y < num_classes})
    if bad:
        raise gr.Error(f"class labels {bad} out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return out


def random_seed() -> int:
    return random.randint(0, 2**31 - 1)


def generate_kwargs(meta: dict[str, Any], entry: ModelEntry, scheduler: str, steps: int, cfg_scale: float,
                    batch_size: int, device: Any, dtype: Any, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of `dit.pipeline.generate` for a form. EXTENSION POINT: options of later features
    (e.g. `adapters=...`) arrive in `extra` and are passed through unchanged."""
    return dict(scheduler=scheduler, steps=int(steps), cfg_scale=float(cfg_scale), objective=meta["objective"],
                model_name=meta.get("name") or entry.path.name, class_names=meta.get("class_names"),
                batch_size=int(batch_size), device=device, dtype=dtype, latent_scale=meta.get("latent_scale"),
                **extra)


@dataclass
class GenerationRequest:
    entry: ModelEntry
    model: Any
    meta: dict[str, Any]
    labels: list[int]
    seeds: list[int]
    per_label: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_form(cls, ctx: Studio, model: str | None, labels: Any, images_per_label: int, steps: int,
                  cfg_scale: float, scheduler: str, seed: int, batch_size: int, device: str = "auto",
                  dtype: str = "fp32", attention_backend: str = MODEL_BACKEND,
                  **extra: Any) -> "GenerationRequest":
        from dit.schedulers import get_sampler

        for name, value, low in (("steps", steps, 1), ("images per label", images_per_label, 1),
                                 ("batch size", batch_size, 1)):
            if value is None or int(value) < low or int(value) != float(value):
                raise gr.Error(f"{name} must be a whole number of at least {low} (got {value})")
        if cfg_scale is None or not math.isfinite(float(cfg_scale)) or float(cfg_scale) < 0:
            raise gr.Error(f"cfg scale must be a number >= 0 (got {cfg_scale}); 1 disables guidance")
        if seed is None or int(seed) < 0:
            raise gr.Error(f"seed must be a whole number >= 0 (got {seed})")
        backend = None if attention_backend in (None, "", MODEL_BACKEND) else attention_backend
        net, meta, entry = ctx.load_model(model, device, dtype, backend)
        num_classes = net.config.num_classes
        ids = parse_labels(labels, num_classes, meta.get("class_names"))
        sched = meta["default_scheduler"] if scheduler in (None, "", AUTO) else scheduler
        try:
            get_sampler(sched, meta["objective"])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if meta.get("vae") or net.config.in_channels not in (1, 3):
            raise gr.Error(f"{entry.id} is a latent model: the studio UI samples pixel-space models; use "
                           "`python sample.py --checkpoint ... --vae FOLDER` for it")
        per = int(images_per_label)
        full = [y for y in ids for _ in range(per)]
        seeds = [int(seed) + i for i in range(len(full))]
        param = next(net.parameters())
        kwargs = generate_kwargs(meta, entry, sched, steps, cfg_scale, batch_size, param.device, param.dtype, **extra)
        return cls(entry, net, meta, full, seeds, per, kwargs)

    def run(self, job: Job | None = None, preview_every: int = 5):
        """`dit.pipeline.generate` with progress reports, x0 previews and the job's cancel event."""
        from dit.pipeline import generate

        callbacks: dict[str, Any] = {}
        if job is not None:
            callbacks = dict(callback=lambda d, n: job.report(d, n, "sampling"),
                             preview=lambda d, n, ims: job.report(d, n, "sampling", preview=ims),
                             preview_every=preview_every, cancel=job.cancel)
        return generate(self.model, self.labels, self.seeds, progress=False, **self.kwargs, **callbacks)

    def grid_cols(self) -> int | None:
        if self.per_label > 1:
            return self.per_label
        return len(self.labels) if len(self.labels) <= 10 else None

    def save(self, generated: Any, folder: Path) -> list[Path]:
        """The PNGs `sample.py` writes for the same request (names, metadata, grid.png)."""
        return generated.save(folder, grid=True, grid_cols=self.grid_cols())

    def caption(self, i: int) -> str:
        names = self.meta.get("class_names")
        y = self.labels[i]
        name = f" ({names[y]})" if names and str(names[y]) != str(y) else ""
        return f"class {y}{name} · seed {self.seeds[i]}"


def preview_grid(images: list[Image.Image], size: int = PREVIEW_SIZE, ncols: int | None = None) -> Image.Image:
    """A grid of the predicted x0 images, enlarged (nearest) so 32-px digits are visible."""
    from dit.pipeline import image_grid

    grid = image_grid(images, ncols).convert("RGB")
    scale = max(1, size // max(grid.size))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid
