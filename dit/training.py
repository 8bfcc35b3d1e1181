"""DiT training with Hugging Face Accelerate (the logic behind `train.py`).

One script for one CPU, N GPUs (`accelerate launch --multi_gpu --num_processes N train.py ...`) and
2 CPU ranks over gloo (`accelerate launch --multi_gpu --num_processes 2 train.py ...` on a CPU-only
machine: `Accelerator(cpu=True)` is what makes the two processes one job). Checkpoints are
`OUTPUT/checkpoint-<step>/` written atomically; `--resume-from latest` continues the step count,
optimizer, LR schedule, EMA, RNG and data order; the final export is a studio checkpoint folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .checkpoint import save_checkpoint
from .compile import add_compile_argument
from .config import model_kwargs, preset_names
from .ema import EMA
from .model import DiT, count_params
from .nonfinite import NonFiniteGuard
from .perf import ThroughputMeter
from .schedulers import get_objective, sampler_names

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAIN_STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"


# ---------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a DiT (any attention variant) with Accelerate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default="digits", help="'digits' (embedded scikit-learn digits, 32x32) or a folder of images "
                                       "(class sub-folders become labels)")
    a("--model", default="DiT-Digits/4", help=f"preset: {', '.join(preset_names())}; or a checkpoint folder, "
                                              "whose architecture (config.json) is used as is")
    a("--image-size", type=int, default=None, help="image size for folders (digits: 32)")
    a("--channels", type=int, default=3, choices=(1, 3), help="image channels for folders")
    a("--random-flip", action="store_true", help="horizontal flips (folders only; never for digits)")
    a("--skip-bad-images", action="store_true", help="skip unreadable images instead of failing")
    a("--vae", default=None, help="local diffusers AutoencoderKL folder: train in its latent space (cached)")
    a("--attention", default="softmax", help="attention variant, or a comma-separated list, one per block")
    a("--attention-backend", default="sdpa", help="softmax kernel backend: sdpa | xformers | math | auto")
    a("--attention-options", default=None, help="JSON dict of attention options (e.g. '{\"window\": [2, 2]}')")
    a("--mlp", dest="mlp_type", default="mlp", help="MLP type: mlp | mixffn")
    a("--dynamic", default=None, help="JSON dict enabling DyDiT dynamic width (e.g. '{\"target\": 0.5}')")
    a("--stratify-timesteps", type=int, default=0, metavar="K",
      help="split the timestep range into K strata and give global-batch sample g stratum g mod K (DyDiT's "
           "t-sampling, over the global batch, not per rank; 0: uniform)")
    a("--router-lr", type=float, default=None,
      help="learning rate of DyDiT's routers (default: --lr); short fine-tunes need a larger one")
    a("--objective", default="ddpm", choices=("ddpm", "flow"))
    a("--learn-sigma", dest="learn_sigma", action=argparse.BooleanOptionalAction, default=None,
      help="learned variance (default: on for ddpm, off for flow)")
    a("--class-dropout", type=float, default=0.1, help="label drop probability for classifier-free guidance")
    a("--max-steps", "--max_train_steps", dest="max_steps", type=int, default=1000)
    a("--batch-size", "--train_batch_size", dest="batch_size", type=int, default=32, help="per process")
    a("--gradient-accumulation-steps", "--gradient_accumulation_steps", dest="grad_accum", type=int, default=1)
    a("--lr", "--learning_rate", dest="lr", type=float, default=1e-4)
    a("--lr-warmup-steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    a("--ema-decay", type=float, default=0.9999)
    a("--mixed-precision", "--mixed_precision", dest="mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    a("--seed", type=int, default=0)
    a("--output-dir", "--output_dir", dest="output_dir", default="runs/dit")
    a("--checkpointing-steps", "--checkpointing_steps", dest="checkpointing_steps", type=int, default=500)
    a("--checkpoints-total-limit", "--checkpoints_total_limit", dest="checkpoints_total_limit", type=int, default=3)
    a("--resume-from", "--resume_from_checkpoint", dest="resume_from", default=None,
      help="'latest' or a checkpoint folder")
    a("--init-from", default=None, help="initialise weights from a checkpoint (matching keys and shapes)")
    a("--init-attention", default="all", choices=("all", "proj", "none"),
      help="with --init-from: which attention weights to inherit (LiT: 'none' re-initialises attention)")
    a("--teacher", default=None, help="distil from a trained checkpoint's outputs (LiT's hybrid distillation)")
    a("--distill-eps", type=float, default=0.5, help="weight of ||eps_teacher - eps_student||^2 (LiT lambda1)")
    a("--distill-var", type=float, default=0.05, help="weight of the variance-output distillation (LiT lambda2)")
    a("--sample-every", type=int, default=0, help="write an EMA sample grid every N steps (0: only at the end)")
    a("--sample-scheduler", default=None, help="scheduler for previews and the exported default")
    a("--sample-steps", type=int, default=None)
    a("--sample-cfg-scale", type=float, default=2.0)
    a("--log-every", type=int, default=50)
    a("--report-to", default="auto", choices=("auto", "none", "tensorboard"),
      help="auto: TensorBoard when installed; metrics.jsonl is always written")
    a("--num-workers", type=int, default=None,
      help="data-loading worker processes (default: 0, or up to 8 for image folders on a GPU)")
    a("--gradient-checkpointing", action="store_true",
      help="recompute each block's activations in the backward pass (less memory, ~30%% more compute)")
    add_compile_argument(p)
    a("--preview-images", type=int, default=None,
      help="images in each EMA preview grid (default: scaled to the run's cost, at most 64; 0 = no previews)")
    a("--preview-steps", type=int, default=None,
      help="sampler steps of the previews (default: --sample-steps, fewer for short runs)")
    a("--no-preview", action="store_true", help="write no preview grids (same as --preview-images 0)")
    a("--cpu", action="store_true", help="force CPU even when a GPU is present")
    a("--export-dir", default=None, help="final export folder (default OUTPUT/final)")
    from .adapters.training import add_adapter_arguments

    add_adapter_arguments(p)  # --adapter lora|td-lora|diffscaler, --adapter-rank, ...
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.learn_sigma is None:
        args.learn_sigma = args.objective == "ddpm"
    if args.objective == "flow" and args.learn_sigma:
        raise SystemExit("error: --learn-sigma has no meaning for the flow objective; drop it")
    if args.sample_scheduler is None:
        args.sample_scheduler = "dpm++" if args.objective == "ddpm" else "flow-euler"
    if args.sample_scheduler not in sampler_names(args.objective):
        raise SystemExit(f"error: --sample-scheduler {args.sample_scheduler!r} cannot sample a {args.objective} "
                         f"model; choose from {', '.join(sampler_names(args.objective))}")
    if args.sample_steps is None:
        args.sample_steps = 25
    for name in ("max_steps", "batch_size", "grad_accum", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    return args


# ---------------------------------------------------------------------------- data
def build_dataset(args: argparse.Namespace, accelerator: Any) -> torch.utils.data.Dataset:
    from .data import DIGITS_CLASSES, DIGITS_DATASETS, ImageFolderDataset, TensorImageDataset, cache_latents
    from .data import load_digits_dataset

    if args.data in DIGITS_DATASETS:  # digits | digits-inverted
        images, labels = load_digits_dataset(args.data, "train", size=args.image_size or 32)
        dataset = TensorImageDataset(images, labels, DIGITS_CLASSES)
    else:
        size = args.image_size or 256
        dataset = ImageFolderDataset(args.data, size, args.channels, args.skip_bad_images, args.random_flip)
        if dataset.num_skipped:
            accelerator.print(f"skipped {dataset.num_skipped} unreadable image(s) in {args.data}")
    if args.vae:
        cache = os.path.join(args.output_dir, "latents.safetensors")
        with accelerator.main_process_first():
            dataset = cache_latents(dataset, args.vae, cache, device=str(accelerator.device))
    return dataset


class StepBatchSampler(torch.utils.data.Sampler):
    """Per-rank index batches for micro-steps `start, start+1, ...`: epoch e is a permutation seeded by
    (seed, e), split into global batches, each global batch sharded over ranks. Deterministic, so a
    resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, start: int = 0):
        if n < batch_size * world:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch ({batch_size} x {world} "
                             "processes); lower --batch-size")
        self.n, self.batch_size, self.world, self.rank, self.seed, self.start = n, batch_size, world, rank, seed, start
        self.per_epoch = n // (batch_size * world)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            epoch, b = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            g = self.batch_size * self.world
            chunk = perm[b * g:(b + 1) * g]
            yield chunk[self.rank::self.world].tolist()
            step += 1

    def __len__(self) -> int:  # infinite; a large number for DataLoader's sake
        return sys.maxsize


def build_loader(dataset: torch.utils.data.Dataset, sampler: StepBatchSampler, args: argparse.Namespace,
                 device: torch.device) -> Any:
    """Batches for the sampler: in-memory tensors (digits, cached latents) indexed directly, on the GPU when
    they fit in a quarter of its free memory; folders through a DataLoader with workers and pinned memory."""
    from .data import LatentDataset, TensorImageDataset

    if isinstance(dataset, (TensorImageDataset, LatentDataset)) and not args.num_workers:
        return DeviceTensorLoader(dataset, sampler, device)
    workers = args.num_workers
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0
    # Its own generator: creating the iterator must not consume the (restored) global RNG stream.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None,
                                       generator=torch.Generator().manual_seed(args.seed))


class DeviceTensorLoader:
    """Index an in-memory dataset batch by batch (no per-item Python calls); the tensors move to the GPU once
    when they fit in a quarter of its free memory, else each batch is copied from pinned memory."""

    def __init__(self, dataset: Any, sampler: StepBatchSampler, device: torch.device):
        self.sampler = sampler
        self.scale = getattr(dataset, "scale", None)  # LatentDataset: cached posterior (mean, std), sampled per batch
        tensors = [dataset.mean, dataset.std] if self.scale is not None else [dataset.images]
        tensors.append(torch.as_tensor(dataset.labels).long())
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            fits = sum(t.numel() * t.element_size() for t in tensors) < free // 4
            tensors = [t.to(device) if fits else t.pin_memory() for t in tensors]
        self.tensors = tensors

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.tensors[0].device
        for idx in self.sampler:
            index = torch.as_tensor(idx)
            if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy would sync every step
                index = index.pin_memory().to(device, non_blocking=True)
            batch = [t.index_select(0, index) for t in self.tensors]
            if self.scale is not None:
                mean, std, labels = batch
                yield (mean + std * torch.randn_like(std)) * self.scale, labels
            else:
                yield batch[0], batch[1]


# ---------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, dataset: torch.utils.data.Dataset) -> DiT:
    if getattr(args, "adapter", None):  # the --init-from base, frozen, with a fresh trainable adapter
        from .adapters.training import build_adapter_model

        return build_adapter_model(args)
    x0, _ = dataset[0]
    classes = getattr(dataset, "classes", ["0"])
    overrides: dict[str, Any] = dict(
        input_size=x0.shape[-1], in_channels=x0.shape[0], num_classes=len(classes),
        learn_sigma=args.learn_sigma, class_dropout_prob=args.class_dropout,
        attention=args.attention, attention_backend=args.attention_backend, mlp_type=args.mlp_type,
    )
    if x0.shape[-1] != x0.shape[-2]:
        raise ValueError("training images must be square; use --image-size")
    if args.attention_options:
        overrides["attention_options"] = json.loads(args.attention_options)
    if args.dynamic:
        overrides["dynamic"] = json.loads(args.dynamic)
    if os.path.isdir(args.model):  # a checkpoint folder: its own architecture (e.g. a grafted model)
        model = DiT.from_config(folder_architecture(args.model, overrides))
    else:
        model = DiT(**model_kwargs(args.model, **overrides))
    if args.init_from:
        init_weights_from(model, args.init_from, args.init_attention)
    return model


def folder_architecture(folder: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config.json of a checkpoint folder given as --model, with the data's sizes checked against it and the
    training-only settings (label dropout, kernel backend, --dynamic) applied; --attention / --mlp are ignored."""
    cfg = {k: v for k, v in DiT.load_config(folder).items() if not k.startswith("_")}
    for key in ("input_size", "in_channels", "num_classes", "learn_sigma"):
        if key in cfg and cfg[key] != overrides[key]:
            raise ValueError(f"--model {folder}: the checkpoint has {key}={cfg[key]!r} but the data / flags give "
                             f"{overrides[key]!r}; train it on data of its own size and classes")
    for key in ("class_dropout_prob", "attention_backend", "dynamic"):
        if key in overrides:
            cfg[key] = overrides[key]
    return cfg


def init_weights_from(model: DiT, path: str, attention: str = "all") -> None:
    """Copy every weight whose name and shape match (e.g. a softmax DiT into a linear-attention one).

    `attention`: "all" matching attention weights too, "proj" only their output projections, "none" none
    (LiT's weight-inheritance finding: keep everything but attention)."""
    from .checkpoint import weights_file
    from safetensors.torch import load_file

    if os.path.isdir(path) and (Path(path) / TRAIN_STATE_FILE).exists():
        source = load_file(str(training_checkpoint_weights(Path(path))))  # OUTPUT/checkpoint-<step>
    else:
        source = load_file(str(weights_file(path))) if os.path.isdir(path) else None
    if source is None:
        raise FileNotFoundError(f"--init-from {path!r} is not a studio checkpoint folder")
    own = model.state_dict()
    def wanted(key: str) -> bool:
        return ".attn." not in key or attention == "all" or (attention == "proj" and ".attn.proj." in key)

    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and wanted(k)}
    if not matched:
        raise ValueError(f"--init-from {path}: no weight matches this model (different preset or sizes?)")
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(own) - set(matched))
    print(f"initialised {len(matched)}/{len(own)} tensors from {path}"
          + (f"; new (not inherited): {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}" if skipped else ""))


def load_teacher(path: str, device: Any) -> DiT:
    from .convert import load_any

    teacher, _ = load_any(path, device=device)
    return teacher.eval().requires_grad_(False)


def distillation_losses(model: Any, teacher: DiT, objective: Any, x: torch.Tensor, y: torch.Tensor,
                        student: DiT, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """LiT's hybrid distillation: L_simple (+ L_vb) + l1 ||eps_T - eps_S||^2 + l2 ||Sigma_T - Sigma_S||^2,
    with the teacher seeing the same noised input and the same (possibly dropped) label."""
    if teacher.out_channels != student.out_channels or teacher.config.num_classes != student.num_classes:
        raise ValueError("--teacher must predict the same channels and classes as the student")
    batch = objective.noise(x)
    drop = (torch.rand(y.shape[0], device=y.device) < student.config.class_dropout_prob).long()
    out = model(batch.x_t, batch.t, y, force_drop_ids=drop)
    terms = objective.loss_terms(out, batch)
    with torch.no_grad():
        target = teacher(batch.x_t, batch.t, torch.where(drop.bool(), torch.full_like(y, student.num_classes), y))
    c = x.shape[1]
    terms["distill_eps"] = ((out[:, :c].float() - target[:, :c].float()) ** 2).mean(dim=(1, 2, 3))
    terms["loss"] = terms["loss"] + args.distill_eps * terms["distill_eps"]
    if out.shape[1] == 2 * c:
        terms["distill_var"] = ((out[:, c:].float() - target[:, c:].float()) ** 2).mean(dim=(1, 2, 3))
        terms["loss"] = terms["loss"] + args.distill_var * terms["distill_var"]
    return terms


# ---------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
             and (p / TRAIN_STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def resolve_resume(args: argparse.Namespace) -> Path | None:
    if not args.resume_from:
        existing = list_checkpoints(args.output_dir)
        if existing:  # a fresh run would overwrite that run's checkpoints, metrics and export
            raise ValueError(f"{args.output_dir} already holds {existing[-1].name}: pass --resume-from latest to "
                             "continue that run, or choose another --output-dir (nothing is overwritten)")
        return None
    if args.resume_from == "latest":
        ckpts = list_checkpoints(args.output_dir)
        return ckpts[-1] if ckpts else None  # nothing yet: start fresh
    path = Path(args.resume_from)
    if not (path / TRAIN_STATE_FILE).exists():
        raise FileNotFoundError(f"--resume-from {path}: not a complete training checkpoint "
                                f"(no {TRAIN_STATE_FILE}); use 'latest' or an OUTPUT/checkpoint-<step> folder")
    return path


# Settings that define the model and its objective: a resumed run must use the same ones.
RESUME_MUST_MATCH = ("model", "attention", "attention_options", "mlp_type", "dynamic", "objective", "learn_sigma",
                     "image_size", "channels", "vae", "class_dropout", "adapter", "adapter_rank", "adapter_alpha",
                     "adapter_targets", "adapter_rslora", "adapter_options")


def training_checkpoint_weights(path: Path) -> Path:
    """The full-weights file of a training checkpoint: the raw weights (`model.safetensors`, single process or
    DDP) or else the EMA weights (always full; FSDP's own model state is sharded)."""
    for name in ("model.safetensors", EMA_FILE):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor {EMA_FILE}")


def distributed_kind(accelerator: Any) -> str:
    """'FSDP' or 'DDP/single' (the two layouts accelerator.save_state writes)."""
    return "FSDP" if "FSDP" in str(accelerator.distributed_type) else "DDP/single"


def check_resume_layout(path: Path, accelerator: Any) -> None:
    """FSDP checkpoints (sharded model/optimizer state) and DDP/single-process ones (model.safetensors) do not
    load into each other through accelerator.load_state: say so, with the way to continue."""
    saved = json.loads((path / TRAIN_STATE_FILE).read_text()).get("distributed", "DDP/single")
    now = distributed_kind(accelerator)
    if saved != now:
        raise ValueError(f"cannot resume from {path}: it was saved under {saved}, this run is {now}; Accelerate "
                         "stores the model and optimizer state in a different layout for each. Fix: resume with the "
                         f"same launch configuration ({saved}), or start a new --output-dir with --init-from {path} "
                         "(continues from its weights; the optimizer state and step count start afresh).")


def check_resume_compatible(path: Path, args: argparse.Namespace) -> None:
    saved = json.loads((path / TRAIN_STATE_FILE).read_text()).get("args", {})
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, now {getattr(args, k)!r}"
             for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was trained with different settings:\n  "
                         + "\n  ".join(diffs) + "\nFix: resume with the same settings, or start a new --output-dir "
                         "and use --init-from to inherit its weights (e.g. softmax -> linear attention).")


def save_training_checkpoint(accelerator: Any, ema: EMA, step: int, args: argparse.Namespace) -> Path:
    """accelerator.save_state + EMA + step into a temp folder, then an atomic rename; prune old ones."""
    from safetensors.torch import save_file

    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = Path(args.output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank's RNG file is in the temp folder before it is renamed
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps({"step": step, "args": vars(args),
                                                        "distributed": distributed_kind(accelerator),
                                                        "num_processes": accelerator.num_processes},
                                                       indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = list_checkpoints(args.output_dir)
        for old in ckpts[: max(0, len(ckpts) - args.checkpoints_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_checkpoint(accelerator: Any, ema: EMA, path: Path) -> int:
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    ema.load_state_dict(load_file(str(path / EMA_FILE)))
    return int(json.loads((path / TRAIN_STATE_FILE).read_text())["step"])


# ---------------------------------------------------------------------------- previews and export
def studio_meta(args: argparse.Namespace, classes: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "objective": args.objective,
        "default_scheduler": args.sample_scheduler,
        "default_steps": args.sample_steps,
        "default_cfg_scale": args.sample_cfg_scale,
        "class_names": classes,
        "data": args.data if args.data in ("digits", "digits-inverted") else os.path.abspath(args.data),
        "vae": os.path.abspath(args.vae) if args.vae else None,
    }
    meta.update(extra or {})
    return meta


PREVIEW_SHARE = 0.1  # default previews cost at most ~10% of the training compute they follow (floors aside)


def preview_plan(n_classes: int, args: argparse.Namespace, trained_images: int | None) -> tuple[torch.Tensor, int]:
    """(labels, sampler steps) of a preview grid.

    Default: up to 8 images per class (64 at most) at --sample-steps, shrunk so that its forwards (images x
    steps, x2 with CFG) stay within PREVIEW_SHARE of the training forwards since the last preview
    (3 x `trained_images`: forward + backward), with floors of min(classes, 8) images and 2 steps.
    --preview-images / --preview-steps override."""
    full = n_classes * max(1, min(8, 64 // n_classes))
    steps = args.preview_steps or args.sample_steps
    images = args.preview_images
    if images is None:
        images = full
        if trained_images is not None and args.preview_steps is None:
            budget = PREVIEW_SHARE * 3 * trained_images / (2 if args.sample_cfg_scale != 1 else 1)
            images = int(max(min(n_classes, 8), min(full, budget // steps)))
            steps = int(max(2, min(steps, budget // images)))
    if images >= n_classes:
        labels = torch.arange(n_classes).repeat_interleave(images // n_classes)
    else:  # fewer images than classes: classes spread over the range
        labels = torch.div(torch.arange(images) * n_classes, images, rounding_mode="floor")
    return labels, steps


def write_preview(model: DiT, args: argparse.Namespace, classes: list[str], step: int, device: Any,
                  trained_images: int | None = None) -> Path | None:
    """An EMA sample grid `OUTPUT/samples/step-<step>.png` (its cost: `preview_plan`); None when disabled."""
    from .pipeline import image_grid, to_pil_images
    from .schedulers import sample

    if args.no_preview or args.preview_images == 0:
        return None
    n_classes = len(classes)
    labels, steps = preview_plan(n_classes, args, trained_images)
    per_class = max(1, len(labels) // n_classes)
    seeds = list(range(len(labels)))
    print(f"preview: {len(labels)} images x {steps} {args.sample_scheduler} steps (EMA weights) ...", flush=True)
    shape = (model.in_channels, model.config.input_size, model.config.input_size)
    x = sample(model, labels, seeds, shape, args.sample_scheduler, steps, args.sample_cfg_scale,
               args.objective, model.config.learn_sigma, model.num_classes, device=device,
               clip_denoised=not args.vae, progress=True, desc=f"preview at step {step}")
    if args.vae:
        from .pipeline import decode_latents, load_vae

        x = decode_latents(load_vae(args.vae, device), x)
    out = Path(args.output_dir) / "samples" / f"step-{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(to_pil_images(x), ncols=per_class if n_classes > 1 and len(labels) >= n_classes else 8).save(out)
    return out


# ---------------------------------------------------------------------------- training
class MetricsLogger:
    def __init__(self, output_dir: str, report_to: str, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and report_to in ("auto", "tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "logs"))
            except Exception:  # tensorboard not installed
                if report_to == "tensorboard":
                    raise SystemExit("error: --report-to tensorboard needs `pip install tensorboard`")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)


def train(args: argparse.Namespace) -> Path:
    """Run training; returns the exported checkpoint folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    try:
        accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                                  gradient_accumulation_steps=args.grad_accum)
    except RuntimeError as err:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and not torch.cuda.is_available():
            raise ValueError("FSDP needs GPUs: neither torch's FSDP nor Accelerate's FSDP plugin runs on CPU-only "
                             "machines. Fix: on this machine use DDP over gloo (`accelerate launch --multi_gpu "
                             "--num_processes N train.py ...`), or run the FSDP config on a GPU machine") from err
        raise
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.device.type == "cuda":
        from .perf import enable_tf32

        enable_tf32()
    set_seed(args.seed * 1000 + rank)  # different noise per rank, reproducible
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    dataset = build_dataset(args, accelerator)
    classes = list(getattr(dataset, "classes", ["0"]))
    model = build_model(args, dataset)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    objective = get_objective(args.objective)
    if args.stratify_timesteps:  # DyDiT: every global batch covers every part of the schedule
        from .dynamic import stratify_timesteps

        stratify_timesteps(objective, args.stratify_timesteps, args.batch_size, rank, world)
    ema = EMA(model, args.ema_decay)
    # only trainable parameters (an --adapter run freezes the base: no optimizer state for it)
    routers = [p for n, p in model.named_parameters() if "_router." in n and p.requires_grad]
    others = [p for n, p in model.named_parameters() if "_router." not in n and p.requires_grad]
    groups = [{"params": others}] + ([{"params": routers, "lr": args.router_lr or args.lr}] if routers else [])
    # fused: one kernel for all parameters, and it takes the non-finite guard's device-side skip flag
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if args.compile:
        from .compile import compile_model

        compile_model(model, args.compile)  # after the EMA copy: the EMA stays eager
    warmup = max(1, args.lr_warmup_steps)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    # The LR schedule is stepped once per optimizer step by hand (a prepared scheduler would step once per
    # process) and saved with the training state.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_schedule)
    ema.model.to(accelerator.device)

    resume = resolve_resume(args)
    step = 0
    if resume is not None:
        check_resume_compatible(resume, args)
        check_resume_layout(resume, accelerator)
        step = load_training_checkpoint(accelerator, ema, resume)
        accelerator.print(f"resumed from {resume} at step {step}")
    if step >= args.max_steps:
        accelerator.print(f"already at step {step} >= --max-steps {args.max_steps}; exporting")

    sampler = StepBatchSampler(len(dataset), args.batch_size, world, rank, args.seed, start=step * args.grad_accum)
    # Its own generator: creating the iterator must not consume the (restored) global RNG stream.
    loader = build_loader(dataset, sampler, args, accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    logger = MetricsLogger(args.output_dir, args.report_to, accelerator.is_main_process)
    if accelerator.is_main_process and step == 0:
        (Path(args.output_dir) / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))
        accelerator.print(f"{args.model}: {count_params(unwrapped) / 1e6:.2f}M parameters, {world} process(es), "
                          f"global batch {args.batch_size * world * args.grad_accum}, device {accelerator.device}")
    logger.log(step, {"num_processes": world})

    teacher = load_teacher(args.teacher, accelerator.device) if args.teacher else None
    last_good = list_checkpoints(args.output_dir)
    bar = tqdm(total=args.max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    start_time, start_step, running = time.time(), step, []
    guard = NonFiniteGuard(optimizer, accelerator.device, world, accelerator.reduce, accelerator.scaler)
    speed = ThroughputMeter(unwrapped, args, world, accelerator.device, start_step=step)

    def last_good_text() -> str:
        return f"the last good checkpoint is {last_good[-1]}" if last_good else "no checkpoint was written yet"

    stop_requested = stop_on_sigterm() if world == 1 else None
    data_iter = iter(loader)
    per_batch_label_check = not isinstance(loader, DeviceTensorLoader)
    if not per_batch_label_check:  # in-memory data: every label checked once here, not one host read per step
        labels = loader.tensors[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= unwrapped.num_classes):
            raise ValueError(f"labels out of range [0, {unwrapped.num_classes - 1}] in the training data")
    model.train()
    while step < args.max_steps:
        x, y = next(data_iter)
        if per_batch_label_check and ((y < 0).any() or (y >= unwrapped.num_classes).any()):  # CPU tensors
            raise ValueError(f"labels out of range [0, {unwrapped.num_classes - 1}] in the batch at step {step}")
        x = x.to(accelerator.device, non_blocking=True)
        y = y.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            if teacher is None:
                terms = objective.training_losses(model, x, y)
            else:
                terms = distillation_losses(model, teacher, objective, x, y, unwrapped, args)
            loss = terms["loss"].mean()
            for name, value in unwrapped.auxiliary_losses(step).items():
                terms[name] = value.detach().reshape(1)
                loss = loss + value
            guard.observe_loss(loss)  # on the device; read only at the intervals below
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if accelerator.sync_gradients:
                keep = guard.step(optimizer, grad_norm)  # a bad step is skipped on the device
                lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        running.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        step += 1
        guard.record(step, keep)
        ema.update(model, keep=keep)  # the prepared model: under FSDP the EMA gathers the full weights
        bar.update(1)
        due_log = step % args.log_every == 0 or step == args.max_steps
        due_save = step % args.checkpointing_steps == 0 or step == args.max_steps
        if due_log or due_save or (args.sample_every and step % args.sample_every == 0):
            guard.check(last_good_text())
        if due_log:
            mean_loss = accelerator.reduce(torch.stack(running).mean(), "mean").item()
            running = []
            values = {"loss": mean_loss, "lr": lr_schedule.get_last_lr()[0],
                      "steps_per_sec": (step - start_step) / max(1e-9, time.time() - start_time),
                      **speed.values(step)}
            values.update({k: float(v.detach().mean()) for k, v in terms.items() if k != "loss"})
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            logger.log(step, values)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if due_save:
            last_good.append(save_training_checkpoint(accelerator, ema, step, args))
        if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
            write_preview(ema.model, args, classes, step, accelerator.device,
                          args.sample_every * args.batch_size * world * args.grad_accum)
        if args.sample_every and step % args.sample_every == 0:
            accelerator.wait_for_everyone()
        if stop_requested is not None and stop_requested.is_set():  # SIGTERM (e.g. the UI's Stop)
            if not due_save:
                last_good.append(save_training_checkpoint(accelerator, ema, step, args))
            bar.close()
            accelerator.print(f"stopped by SIGTERM at step {step}: {last_good[-1]} is resumable "
                              "(--resume-from latest)")
            accelerator.end_training()
            return last_good[-1]
    bar.close()
    # Every rank's weights must be identical after synchronised (averaged) gradient steps: log the evidence.
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    logger.log(step, {"num_processes": world, "param_checksums": checksums})

    export = Path(args.export_dir or Path(args.output_dir) / "final")
    if accelerator.is_main_process:
        elapsed = time.time() - start_time
        extra = {"training": {"steps": step, "seconds_this_run": round(elapsed, 1), "num_processes": world,
                              "command": " ".join(["python", "train.py", *sys.argv[1:]])}}
        if args.adapter:  # the adapter file alone (+ card), not a copy of the base
            from .adapters.training import export_adapter

            export_adapter(ema.model, export, args, extra["training"])
        else:
            save_checkpoint(ema.model, export, studio_meta(args, classes, extra))
        if not args.sample_every or step % args.sample_every:
            write_preview(ema.model, args, classes, step, accelerator.device,
                          (step - start_step) * args.batch_size * world * args.grad_accum or None)
        accelerator.print(f"exported EMA weights to {export}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export


def stop_on_sigterm() -> threading.Event | None:
    """SIGTERM sets the returned event: the loop then saves a checkpoint at the current step and returns
    (single-process runs; with several ranks SIGTERM keeps its default, the last periodic checkpoint stays)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    event = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return event


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from err
