"""`generate()`: model + scheduler (+ VAE) -> PIL images carrying their generation parameters.

Every image gets a PNG text chunk `parameters` (JSON) and the plain keys `class_label`, `seed`,
`steps`, `cfg_scale`, `scheduler`, `model`, so that any image can be reproduced exactly from itself.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .schedulers import GenerationCancelled, sample  # noqa: F401  (re-exported for callers of generate)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}. Valid dtypes: fp32, fp16, bf16")
    if DTYPES[name] == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 inference is not supported on CPU; use --dtype fp32 or bf16")
    return DTYPES[name]


def cast_model(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """Move/cast only when needed (diffusers' ModelMixin.to warns on every dtype argument)."""
    param = next(model.parameters())
    if param.device != torch.device(device):
        model = model.to(device)
    if param.dtype != dtype:
        model = torch.nn.Module.to(model, dtype=dtype)
    return model


def load_vae(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A local diffusers AutoencoderKL folder (the studio never downloads)."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(path):
        raise FileNotFoundError(f"VAE folder {path!r} not found; pass a local folder written by "
                                "AutoencoderKL.save_pretrained (e.g. a downloaded stabilityai/sd-vae-ft-ema)")
    sub = os.path.join(path, "vae")
    return AutoencoderKL.from_pretrained(sub if os.path.isdir(sub) else path).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = scale or float(getattr(vae.config, "scaling_factor", 0.18215))
    return vae.decode(latents.to(vae.dtype) / scale).sample.float()


def to_pil_images(x: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> PIL images (L for 1 channel, RGB for 3)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    images = []
    for a in arr:
        if a.shape[0] == 1:
            images.append(Image.fromarray(a[0], mode="L"))
        elif a.shape[0] == 3:
            images.append(Image.fromarray(np.transpose(a, (1, 2, 0)), mode="RGB"))
        else:
            raise ValueError(f"cannot make an image of {a.shape[0]} channels; latent models need --vae")
    return images


def image_grid(images: Sequence[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    if not images:
        raise ValueError("no images to put in a grid")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (ncols * (w + pad) + pad, nrows * (h + pad) + pad), color=0)
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


@dataclass
class GenerationParams:
    """What reproduces one image exactly (on the same machine and software)."""

    class_label: int
    seed: int
    steps: int
    cfg_scale: float
    scheduler: str
    model: str
    class_name: str | None = None
    dtype: str = "fp32"
    cfg_channels: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def pnginfo(self) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(asdict(self)))
        for key in ("class_label", "seed", "steps", "cfg_scale", "scheduler", "model"):
            info.add_text(key, str(getattr(self, key)))
        return info


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The `parameters` JSON a studio PNG carries."""
    try:
        with Image.open(path) as im:
            text = im.text.get("parameters") if hasattr(im, "text") else None
    except (OSError, SyntaxError) as err:  # missing file, not an image (PIL's UnidentifiedImageError)
        raise ValueError(f"cannot read {path} as a PNG: {err}") from err
    if not text:
        raise ValueError(f"{path} carries no studio `parameters` metadata")
    return json.loads(text)


@dataclass
class Generated:
    images: list[Image.Image]
    params: list[GenerationParams]

    def save(self, folder: str | os.PathLike, prefix: str = "", grid: bool = True,
             grid_cols: int | None = None) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (im, p) in enumerate(zip(self.images, self.params)):
            path = folder / f"{prefix}{i:04d}-class{p.class_label}-seed{p.seed}.png"
            im.save(path, pnginfo=p.pnginfo())
            paths.append(path)
        if grid and self.images:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", json.dumps([asdict(p) for p in self.params]))
            image_grid(self.images, grid_cols).save(folder / f"{prefix}grid.png", pnginfo=info)
        return paths


def generate(model: torch.nn.Module, labels: Sequence[int], seeds: Sequence[int], *, scheduler: str = "ddpm",
             steps: int = 250, cfg_scale: float = 4.0, objective: str = "ddpm", model_name: str = "model",
             class_names: Sequence[str] | None = None, batch_size: int = 16, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, vae: Any = None, latent_scale: float | None = None,
             image_size: int | None = None, cfg_channels: int | None = None,
             callback: Callable[[int, int], None] | None = None, progress: bool = True,
             preview: Callable[[int, int, list[Image.Image]], None] | None = None, preview_every: int = 5,
             cancel: threading.Event | None = None, adapters: Sequence[Any] | None = None,
             check_adapter_base: bool = True) -> Generated:
    """Sample one image per (label, seed) in batches; image i depends only on its own seed and label.

    `callback(done, total)` counts sampler steps over all batches. `preview(done, total, images)` receives
    the predicted x0 of the current batch as PIL images every `preview_every` steps (decoded by the VAE
    for latent models). Setting `cancel` (a `threading.Event`) stops at the next step with
    `dit.schedulers.GenerationCancelled`.
    `adapters`: [(adapter file or `dit.adapters.AdapterFile`, strength), ...] applied for this call only (the
    model is exactly the base again afterwards); each image's `extras["adapters"]` records file, hash and scale.
    """
    if adapters:
        kwargs = {k: v for k, v in locals().items() if k not in ("model", "labels", "seeds", "adapters")}
        from .adapters import adapters_applied

        with adapters_applied(model, adapters, check_base=check_adapter_base) as applied:
            out = generate(model, labels, seeds, **kwargs)
        for p in out.params:
            p.extras["adapters"] = applied
        return out
    labels, seeds = [int(x) for x in labels], [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    num_classes = model.config.num_classes
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"class labels {sorted(set(bad))} out of range: this model has {num_classes} classes "
                         f"(0..{num_classes - 1})")
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    device = torch.device(device)
    size = image_size or model.config.input_size
    p = model.config.patch_size
    if size % p:
        raise ValueError(f"image size {size} is not divisible by the patch size {p}")
    shape = (model.config.in_channels, size, size)
    model = cast_model(model, device, dtype).eval()
    learn_sigma = model.config.learn_sigma
    total_steps = math.ceil(len(labels) / batch_size) * steps
    done = [0]

    def on_step(i: int, n: int, x: torch.Tensor) -> None:
        done[0] += 1
        if callback is not None:
            callback(done[0], total_steps)

    def on_x0(i: int, n: int, x0: torch.Tensor) -> None:
        if preview is not None:
            preview(done[0], total_steps, to_pil_images(decode_latents(vae, x0, latent_scale) if vae is not None else x0))

    images: list[Image.Image] = []
    for start in range(0, len(labels), batch_size):
        y = torch.tensor(labels[start:start + batch_size])
        x = sample(model, y, seeds[start:start + batch_size], shape, scheduler, steps, cfg_scale, objective,
                   learn_sigma, num_classes, cfg_channels, device, dtype, clip_denoised=vae is None,
                   callback=on_step, progress=progress,
                   desc=f"sampling {start + 1}-{start + len(y)}/{len(labels)}",
                   x0_callback=on_x0 if preview is not None else None, x0_every=preview_every, cancel=cancel)
        if vae is not None:
            x = decode_latents(vae, x, latent_scale)
        images += to_pil_images(x)
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    params = [GenerationParams(class_label=y, seed=s, steps=steps, cfg_scale=cfg_scale, scheduler=scheduler,
                               model=model_name, class_name=(class_names[y] if class_names else None),
                               dtype=dtype_name, cfg_channels=cfg_channels)
              for y, s in zip(labels, seeds)]
    return Generated(images, params)
