"""FID-scale sampling: `accelerate launch sample.py --num-fid-samples 50000 --fid-npz OUT.npz` (DiT's
`sample_ddp.py`, made resumable and independent of the number of processes).

- Image i has seed `--seed + i` and label `labels[i % len(labels)]` (default: every class in turn, i.e.
  class-balanced: 50 per class for 50 000 ImageNet samples), whatever the number of processes.
- The N images are cut into fixed shards of `--fid-shard-size` images (batches inside a shard are fixed
  too), and shard j is sampled by rank j mod world. So every image is computed in exactly the same
  batch whatever the number of processes: 1 or 8 ranks write identical arrays.
- Each shard is written atomically (temp file + rename) to `OUT.npz.parts/`; an interrupted run started
  again with the same settings skips the finished shards. Different settings are refused (named).
- When all shards exist, rank 0 writes `OUT.npz` in the layout of ADM's evaluator (`arr_0`: uint8
  (N, H, W, 3), as the original DiT's `sample_ddp.py`), with `labels`, `seeds` and `settings` (a JSON
  string: checkpoint, sampler, steps, CFG, dtype, ...) beside it, atomically. One-channel models are
  stored as RGB (the channel repeated), which Inception features need anyway.
- `python -m dit.eval --fake OUT.npz --real REF.npz|FOLDER` gives FID/KID from it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

SETTINGS_KEYS = ("checkpoint", "model", "scheduler", "steps", "cfg_scale", "cfg_channels", "seed", "labels",
                 "num_samples", "shard_size", "batch_size", "dtype", "image_size", "vae", "attention_backend")


def add_fid_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--num-fid-samples", type=int, default=None,
      help="FID mode: sample N images (split over `accelerate launch` processes) into one --fid-npz file")
    a("--fid-npz", default=None, help="FID mode: output .npz (ADM evaluator layout: arr_0 uint8 NHWC)")
    a("--fid-shard-size", type=int, default=None,
      help="images per resumable shard (default: 4 batches); keep it when resuming")


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def parts_dir(npz: str | os.PathLike) -> Path:
    return Path(str(npz) + ".parts")


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3), the same rounding as the PNGs (`to_pil_images`)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise ValueError(f"cannot store {x.shape[1]}-channel samples as RGB; latent models need --vae")
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _check_or_write_settings(folder: Path, settings: dict[str, Any], is_main: bool) -> None:
    path = folder / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = [f"{k}: saved {saved.get(k)!r}, now {settings.get(k)!r}" for k in SETTINGS_KEYS
                 if saved.get(k) != settings.get(k)]
        if diffs:
            raise ValueError(f"{folder} holds shards of a run with other settings:\n  " + "\n  ".join(diffs)
                             + f"\nFix: rerun with the same settings to resume, or delete {folder} / choose "
                             "another --fid-npz to start over.")
    elif is_main:
        tmp = folder / ".settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, path)


def _shard_done(path: Path, count: int) -> bool:
    if not path.exists():
        return False
    try:
        with np.load(path) as f:
            return f["arr_0"].shape[0] == count
    except Exception:  # a corrupt shard (cannot happen with atomic writes, but never trust it): redo it
        return False


def run_fid_sampling(args: argparse.Namespace) -> Path:
    """Sample `args.num_fid_samples` images over the Accelerate processes into `args.fid_npz`; returns its path."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .compile import compile_model, warm_up
    from .convert import load_any
    from .pipeline import load_vae, resolve_dtype

    if not args.fid_npz:
        raise ValueError("--num-fid-samples needs --fid-npz OUT.npz (where the samples go)")
    if not str(args.fid_npz).endswith(".npz"):
        raise ValueError(f"--fid-npz {args.fid_npz!r} must end in .npz")
    n = int(args.num_fid_samples)
    if n < 1:
        raise ValueError("--num-fid-samples must be at least 1")
    want_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=want_cpu)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda" and getattr(args, "tf32", True):
        from .perf import enable_tf32

        enable_tf32()
    t0 = time.time()
    model, meta = load_any(args.checkpoint, model_name=args.model, device=device, dtype=dtype)
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    if getattr(args, "compile", None):
        compile_model(model, args.compile, verbose=accelerator.is_main_process)
    num_classes = model.config.num_classes
    scheduler = args.scheduler or meta["default_scheduler"]
    steps = args.steps or meta["default_steps"]
    cfg_scale = meta["default_cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    base = list(args.labels) if args.labels else list(range(num_classes))
    if any(not 0 <= y < num_classes for y in base):
        raise ValueError(f"--labels must be in 0..{num_classes - 1}")
    shard_size = args.fid_shard_size or 4 * args.batch_size
    if shard_size < 1:
        raise ValueError("--fid-shard-size must be at least 1")
    vae_path = args.vae or meta.get("vae")
    if vae_path is None and model.config.in_channels not in (1, 3):
        raise ValueError(f"this model works in a {model.config.in_channels}-channel latent space: pass --vae FOLDER")
    settings = {"checkpoint": str(args.checkpoint), "model": meta.get("name") or Path(args.checkpoint).name,
                "scheduler": scheduler, "steps": int(steps), "cfg_scale": float(cfg_scale),
                "cfg_channels": args.cfg_channels, "seed": int(args.seed), "labels": base if args.labels else "all",
                "num_samples": n, "shard_size": int(shard_size), "batch_size": int(args.batch_size),
                "dtype": str(args.dtype), "image_size": args.image_size or model.config.input_size,
                "vae": str(vae_path) if vae_path else None, "attention_backend": args.attention_backend,
                "objective": meta["objective"], "label_rule": "labels[i % len(labels)]", "seed_rule": "seed + i",
                "layout": "arr_0: uint8 (N, H, W, 3) RGB (ADM evaluator); 1-channel models repeated to RGB"}
    parts = parts_dir(args.fid_npz)
    if accelerator.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    _check_or_write_settings(parts, settings, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    vae = load_vae(vae_path, device, dtype) if vae_path else None

    shards = shard_ranges(n, shard_size)
    mine = [(j, a, b) for j, (a, b) in enumerate(shards) if j % world == rank]
    todo = [(j, a, b) for j, a, b in mine if not _shard_done(parts / f"shard-{j:06d}.npz", b - a)]
    skipped = len(mine) - len(todo)
    t_load = time.time() - t0
    t_warm = warm_up(model.eval(), min(args.batch_size, shard_size), args.image_size, cfg_scale != 1.0, vae=vae,
                     latent_scale=meta.get("latent_scale")) \
        if todo and (getattr(args, "compile", None) or device.type == "cuda") else 0.0
    accelerator.print(f"FID sampling: {n} images in {len(shards)} shard(s) of {shard_size} over {world} process(es); "
                      f"{scheduler} {steps} steps, cfg {cfg_scale}"
                      + (f"; resuming: {skipped} shard(s) of this rank already done" if skipped else ""))
    t1 = time.time()
    bar = tqdm(total=sum(b - a for _, a, b in todo), desc=f"FID samples (rank {rank})", unit="img",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for j, a, b in todo:
        labels = [base[i % len(base)] for i in range(a, b)]
        seeds = [args.seed + i for i in range(a, b)]
        out = sample_images(model, labels, seeds, scheduler, steps, cfg_scale, meta["objective"], args.batch_size,
                            device, dtype, vae, meta.get("latent_scale"), args.image_size, args.cfg_channels)
        _atomic_savez(parts / f"shard-{j:06d}.npz", arr_0=to_uint8_nhwc(out),
                      labels=np.asarray(labels, dtype=np.int64), seeds=np.asarray(seeds, dtype=np.int64))
        bar.update(b - a)
    bar.close()
    t_sample = time.time() - t1
    accelerator.wait_for_everyone()
    out_path = Path(args.fid_npz)
    if accelerator.is_main_process:
        assemble_npz(parts, out_path, shards, settings)
        print(f"wrote {out_path} ({n} images) : load {t_load:.1f}s, warm-up {t_warm:.1f}s, sampling "
              f"{t_sample:.1f}s on rank 0 ({sum(b - a for _, a, b in todo) / max(t_sample, 1e-9):.2f} images/s)")
    accelerator.wait_for_everyone()
    return out_path


@torch.no_grad()
def sample_images(model: torch.nn.Module, labels: list[int], seeds: list[int], scheduler: str, steps: int,
                  cfg_scale: float, objective: str, batch_size: int, device: torch.device, dtype: torch.dtype,
                  vae: Any = None, latent_scale: float | None = None, image_size: int | None = None,
                  cfg_channels: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] for (labels, seeds), in fixed batches of `batch_size` (as `generate`,
    without PIL images)."""
    from .pipeline import decode_latents
    from .schedulers import sample

    size = image_size or model.config.input_size
    shape = (model.config.in_channels, size, size)
    outs = []
    for start in range(0, len(labels), batch_size):
        y = torch.tensor(labels[start:start + batch_size])
        x = sample(model, y, seeds[start:start + batch_size], shape, scheduler, steps, cfg_scale, objective,
                   model.config.learn_sigma, model.config.num_classes, cfg_channels, device, dtype,
                   clip_denoised=vae is None, progress=False)
        if vae is not None:
            x = decode_latents(vae, x, latent_scale)
        outs.append(x.float().cpu())
    return torch.cat(outs)


def assemble_npz(parts: Path, out_path: Path, shards: list[tuple[int, int]], settings: dict[str, Any]) -> None:
    """Concatenate the shards in order into one ADM-layout .npz (atomic)."""
    arrays, labels, seeds = [], [], []
    for j, (a, b) in enumerate(shards):
        path = parts / f"shard-{j:06d}.npz"
        if not _shard_done(path, b - a):
            raise RuntimeError(f"shard {path} is missing or incomplete; rerun the same command to finish it")
        with np.load(path) as f:
            arrays.append(f["arr_0"])
            labels.append(f["labels"])
            seeds.append(f["seeds"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out_path, arr_0=np.concatenate(arrays), labels=np.concatenate(labels), seeds=np.concatenate(seeds),
                  settings=np.array(json.dumps(settings)))
    (out_path.with_suffix(".json")).write_text(json.dumps(settings, indent=2))


def read_npz_settings(path: str | os.PathLike) -> dict[str, Any]:
    with np.load(path) as f:
        return json.loads(str(f["settings"])) if "settings" in f.files else {}


def npz_image_batches(path: str | os.PathLike, size: int, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Batches (B, 3, size, size) in [0, 1] from an ADM-layout .npz (`arr_0` uint8 NHWC), resized bicubically
    (PIL, as `dit.eval.load_images`) when `size` differs."""
    from PIL import Image

    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} has no `arr_0` array (ADM evaluator layout: uint8 N x H x W x 3)")
        arr = f["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 (N, H, W, 3)")
    for i in range(0, len(arr), batch_size):
        chunk = arr[i:i + batch_size]
        if chunk.shape[-1] == 1:
            chunk = np.repeat(chunk, 3, axis=-1)
        if chunk.shape[1:3] != (size, size):
            chunk = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in chunk])
        yield torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float() / 255.0


def npz_count(path: str | os.PathLike) -> int:
    with np.load(path) as f:
        return int(f["arr_0"].shape[0])
