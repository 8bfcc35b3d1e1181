"""What `train.py --adapter ...` adds to the training loop: its arguments, the base model with a fresh
trainable adapter (base frozen), and the export (the adapter file alone plus a card).

    python train.py --init-from checkpoints/dit-digits --adapter lora --adapter-rank 4 \\
        --adapter-targets attn mlp --data digits-inverted --objective flow --max-steps 1000
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .apply import add_adapter, adapter_state, save_adapter
from .base import adapter_kind_names
from .targets import DEFAULT_TARGETS, TARGET_GROUPS

ADAPTER_FILE = "adapter.safetensors"
CARD_FILE = "adapter_card.md"
#: train.py arguments that define the adapter (a resumed run must use the same ones)
ADAPTER_ARGS = ("adapter", "adapter_rank", "adapter_alpha", "adapter_targets", "adapter_dropout",
                "adapter_rslora", "adapter_options", "init_from")


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--adapter", default=None, choices=adapter_kind_names(),
      help="train only an adapter of this kind on the --init-from base (base frozen); exports the adapter alone")
    a("--adapter-rank", type=int, default=4, help="LoRA rank r (per expert for td-lora; W_down width for diffscaler)")
    a("--adapter-alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/r (default alpha = r)")
    a("--adapter-targets", nargs="+", default=list(DEFAULT_TARGETS),
      help=f"layer groups ({', '.join(TARGET_GROUPS)}) or module-name suffixes (e.g. attn.qkv, final_layer.linear)")
    a("--adapter-dropout", type=float, default=0.0, help="dropout on the adapter's input (LoRA, TD-LoRA)")
    a("--adapter-rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r) (rsLoRA)")
    a("--adapter-options", default=None,
      help="JSON dict of kind options, e.g. '{\"experts\": 4}' (td-lora) or '{\"nonlinearity\": \"relu\"}' (diffscaler)")


def build_adapter_model(args: argparse.Namespace) -> nn.Module:
    """The --init-from base (its own architecture and weights) with a fresh trainable adapter."""
    from ..convert import load_any

    if not args.init_from:
        raise ValueError("--adapter needs the base model: --init-from CHECKPOINT_FOLDER")
    if not os.path.exists(args.init_from):
        raise FileNotFoundError(f"--init-from {args.init_from!r} does not exist")
    model, meta = load_any(args.init_from, device="cpu")
    objective = meta.get("objective")
    if objective and objective != args.objective:
        raise ValueError(f"the base {args.init_from} was trained with --objective {objective}; an adapter must "
                         f"use the same objective: pass --objective {objective}")
    if bool(model.config.learn_sigma) != bool(args.learn_sigma):
        raise ValueError(f"the base predicts {'a learned variance' if model.config.learn_sigma else 'no variance'}; "
                         f"pass --{'' if model.config.learn_sigma else 'no-'}learn-sigma")
    options = json.loads(args.adapter_options) if args.adapter_options else None
    model.train()
    spec = add_adapter(model, args.adapter, rank=args.adapter_rank, alpha=args.adapter_alpha,
                       targets=args.adapter_targets, dropout=args.adapter_dropout, use_rslora=args.adapter_rslora,
                       options=options)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = adapter_state(model).base_params
    print(f"{args.adapter} adapter: rank {spec.rank}, alpha {spec.alpha:g} (scale {spec.scaling:g}), "
          f"{len(spec.modules)} layers, {trainable:,} trainable parameters = {100 * trainable / base:.2f}% "
          f"of the base's {base:,}")
    return model


def export_adapter(model: nn.Module, export_dir: str | Path, args: argparse.Namespace,
                   training: dict[str, Any]) -> Path:
    """`EXPORT/adapter.safetensors` (metadata: kind, rank, alpha, targets, base hash, ...) + `adapter_card.md`."""
    export_dir = Path(export_dir)
    extra = {"training": {**training, "data": args.data, "base": os.path.abspath(args.init_from)}}
    path = save_adapter(model, export_dir / ADAPTER_FILE, extra=extra)
    write_adapter_card(path, args, training)
    return path


def write_adapter_card(path: Path, args: argparse.Namespace, training: dict[str, Any]) -> Path:
    from .io import load_adapter_file

    f = load_adapter_file(path)
    s = f.spec
    base_params = int(f.metadata.get("base_params", 0)) or 1
    size = path.stat().st_size
    base_file = Path(args.init_from) / "diffusion_pytorch_model.safetensors"
    base_size = base_file.stat().st_size if base_file.exists() else None
    lines = [
        f"# {s.kind} adapter for `{Path(args.init_from).name}`", "",
        f"Trained on `{args.data}` for {training.get('steps')} steps with train.py (base frozen, EMA of the adapter).",
        "",
        "| field | value |", "| --- | --- |",
        f"| kind | {s.kind} |",
        f"| rank / alpha / scale | {s.rank} / {s.alpha:g} / {s.scaling:g}{' (rsLoRA)' if s.use_rslora else ''} |",
        f"| targets | {', '.join(s.targets)} ({len(s.modules)} layers) |",
        f"| options | {json.dumps(s.options)} |",
        f"| parameters | {f.num_params:,} = {100 * f.num_params / base_params:.2f}% of the base's {base_params:,} |",
        f"| file size | {size / 1024:.1f} KiB"
        + (f" ({100 * size / base_size:.1f}% of the base weights file)" if base_size else "") + " |",
        f"| base weights hash | `{f.base_hash}` |",
        f"| file sha256 (first 16) | `{f.file_hash}` |", "",
        "## Exact training command", "", "```", training.get("command", ""), "```", "",
        "## Use", "", "```",
        f"python sample.py --checkpoint {args.init_from} --adapter {path} --adapter-scale 1.0",
        "```", "",
    ]
    card = path.parent / CARD_FILE
    card.write_text("\n".join(lines))
    return card
