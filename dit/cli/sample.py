"""`python sample.py`: sample images from a DiT checkpoint (the bundled digits model by default).

Each image is a PNG carrying its parameters (JSON `parameters` plus plain keys), a grid PNG beside them.
`--params-from IMAGE.png` reproduces an image from its own metadata.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..pipeline import generate, load_vae, read_png_parameters, resolve_device, resolve_dtype
from ..compile import add_compile_argument
from ..fid_sampling import add_fid_arguments
from ..schedulers import SAMPLERS

BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "dit-digits"
IMAGENET_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the original DiT sample.py's classes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample class-conditional images from a DiT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--checkpoint", "--ckpt", default=str(BUNDLED_CHECKPOINT),
      help="studio folder, diffusers DiT folder, or an original DiT .pt state dict (with --model)")
    a("--model", default=None, help="preset for an original .pt checkpoint, e.g. DiT-XL/2")
    a("--labels", type=int, nargs="+", default=None, help="class ids (default: one of each class, up to 10)")
    a("--per-label", type=int, default=1, help="images per label")
    a("--num-images", type=int, default=None, help="total images (labels cycle)")
    a("--steps", "--num-sampling-steps", dest="steps", type=int, default=None)
    a("--cfg-scale", type=float, default=None)
    a("--cfg-channels", type=int, default=None, help="guide only the first K channels (3 = original DiT release)")
    a("--scheduler", default=None, help=f"one of: {', '.join(SAMPLERS)}")
    a("--seed", type=int, default=0, help="image i uses seed + i")
    a("--batch-size", type=int, default=16)
    a("--output", default="samples", help="output folder")
    a("--device", default="auto")
    a("--dtype", default="fp32", help="fp32 | bf16 | fp16 (fp16: GPU only)")
    a("--attention-backend", default=None, help="sdpa | xformers | math | auto")
    a("--vae", default=None, help="local diffusers AutoencoderKL folder (latent models)")
    a("--image-size", type=int, default=None, help="sample size (default: the trained size)")
    a("--params-from", default=None, help="reproduce the image whose PNG metadata is given")
    a("--no-grid", action="store_true")
    a("--adapter", action="append", default=None, metavar="FILE",
      help="adapter file from `train.py --adapter` (repeatable: several are applied together)")
    a("--adapter-scale", action="append", type=float, default=None, metavar="S",
      help="strength of each --adapter, in order (default 1.0; LoRA: multiplies alpha/r)")
    a("--adapter-ignore-base-hash", action="store_true",
      help="apply adapters even when the base weights differ from the ones they were trained on")
    add_compile_argument(p)
    a("--tf32", action=argparse.BooleanOptionalAction, default=True,
      help="TF32 tensor cores for fp32 matmuls on CUDA (as the original DiT sample.py)")
    add_fid_arguments(p)
    return p


def adapter_list(args: argparse.Namespace) -> list[tuple[str, float]]:
    """[(file, scale), ...] from the repeatable --adapter / --adapter-scale."""
    files, scales = args.adapter or [], args.adapter_scale or []
    if len(scales) > len(files):
        raise ValueError(f"{len(scales)} --adapter-scale values for {len(files)} --adapter file(s)")
    return [(f, scales[i] if i < len(scales) else 1.0) for i, f in enumerate(files)]


def load_checkpoint(path: str, model_name: str | None, device: torch.device, dtype: torch.dtype):
    from ..convert import load_any

    return load_any(path, model_name=model_name, device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err


def run(args: argparse.Namespace) -> list[Path]:
    if args.params_from:
        params = read_png_parameters(args.params_from)
        args.labels, args.seed = [params["class_label"]], params["seed"]
        args.steps, args.cfg_scale, args.scheduler = params["steps"], params["cfg_scale"], params["scheduler"]
        args.cfg_channels, args.dtype = params.get("cfg_channels"), params.get("dtype", "fp32")
        args.per_label, args.num_images = 1, None
        recorded = (params.get("extras") or {}).get("adapters") or []
        if recorded and not args.adapter:  # the file path is not stored (only its name and hash)
            named = ", ".join(f"{a.get('file')} (scale {a.get('scale')}, sha256 {a.get('sha256')})" for a in recorded)
            raise ValueError(f"{args.params_from} was made with adapter(s) {named}: pass each with "
                             "--adapter FILE --adapter-scale S to reproduce it")
    if args.num_fid_samples is not None:
        from ..fid_sampling import run_fid_sampling

        return [run_fid_sampling(args)]
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a file, not a folder; choose a folder for the PNGs")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda" and args.tf32:
        from ..perf import enable_tf32

        enable_tf32()
    t0 = time.time()
    model, meta = load_checkpoint(args.checkpoint, args.model, device, dtype)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    if args.compile:
        from ..compile import compile_model

        compile_model(model, args.compile)
    t_load = time.time() - t0
    model_name = meta.get("name") or Path(args.checkpoint).name
    if args.params_from and params.get("model") not in (None, model_name):
        print(f"warning: {args.params_from} was made by model {params['model']!r}, sampling with {model_name!r} "
              "(pass its --checkpoint to reproduce it)", file=sys.stderr)
    num_classes = model.config.num_classes
    scheduler = args.scheduler or meta["default_scheduler"]
    steps = meta["default_steps"] if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {steps})")
    cfg_scale = meta["default_cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    if scheduler not in SAMPLERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}. Valid schedulers: {', '.join(SAMPLERS)}")
    if args.labels is None:
        base = IMAGENET_DEMO_LABELS if num_classes == 1000 else list(range(min(num_classes, 10)))
    else:
        base = args.labels
    if args.num_images is not None:
        if args.num_images < 1:
            raise ValueError("--num-images must be at least 1")
        labels = [base[i % len(base)] for i in range(args.num_images)]
    else:
        if args.per_label < 1:
            raise ValueError("--per-label must be at least 1")
        labels = [y for y in base for _ in range(args.per_label)]
    seeds = [args.seed + i for i in range(len(labels))]
    vae_path = args.vae or meta.get("vae")
    vae = load_vae(vae_path, device, dtype) if vae_path else None
    if vae is None and model.config.in_channels not in (1, 3):
        raise ValueError(f"this model works in a {model.config.in_channels}-channel latent space: pass --vae FOLDER "
                         "(a local diffusers AutoencoderKL, e.g. sd-vae-ft-ema)")
    t_warm = 0.0
    if args.compile or device.type == "cuda":  # compile / kernel set-up outside the sampling time
        from ..compile import warm_up

        t_warm = warm_up(model.eval(), min(args.batch_size, len(labels)), args.image_size, cfg_scale != 1.0,
                         vae=vae, latent_scale=meta.get("latent_scale"))
    t1 = time.time()
    out = generate(model, labels, seeds, scheduler=scheduler, steps=steps, cfg_scale=cfg_scale,
                   objective=meta["objective"], model_name=model_name,
                   class_names=meta.get("class_names"), batch_size=args.batch_size, device=device, dtype=dtype,
                   vae=vae, latent_scale=meta.get("latent_scale"), image_size=args.image_size,
                   cfg_channels=args.cfg_channels, adapters=adapter_list(args),
                   check_adapter_base=not args.adapter_ignore_base_hash)
    t_sample = time.time() - t1
    if args.per_label > 1 and args.num_images is None:
        ncols = args.per_label          # one row per label
    else:
        ncols = len(labels) if len(labels) <= 10 else None

    paths = out.save(args.output, grid=not args.no_grid, grid_cols=ncols)
    print(f"wrote {len(paths)} image(s){'' if args.no_grid else ' and grid.png'} to {args.output} "
          f"({scheduler}, {steps} steps, cfg {cfg_scale}) in {time.time() - t0:.1f}s: load {t_load:.1f}s, "
          f"warm-up {t_warm:.1f}s, sampling {t_sample:.2f}s ({len(labels) / max(t_sample, 1e-9):.2f} images/s)")
    return paths
