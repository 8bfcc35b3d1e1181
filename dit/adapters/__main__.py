"""`python -m dit.adapters`: inspect an adapter file, or merge a LoRA into a new base checkpoint.

    python -m dit.adapters info checkpoints/adapters/lora/adapter.safetensors
    python -m dit.adapters merge checkpoints/dit-digits checkpoints/adapters/lora/adapter.safetensors OUT [--scale 1]

`merge` is the supported route to a quantized adapted model: merge, then `python -m dit.quant OUT ...`
(calibration then sees the adapted weights). TD-LoRA and DiffScaler cannot be merged.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def info(path: str) -> dict:
    from .io import load_adapter_file

    f = load_adapter_file(path)
    base_params = int(f.metadata.get("base_params", 0))
    return {"file": f.path, "sha256": f.file_hash, "kind": f.spec.kind, "rank": f.spec.rank, "alpha": f.spec.alpha,
            "scaling": f.spec.scaling, "use_rslora": f.spec.use_rslora, "targets": f.spec.targets,
            "layers": len(f.spec.modules), "options": f.spec.options, "parameters": f.num_params,
            "fraction_of_base": f.num_params / base_params if base_params else None, "base_hash": f.base_hash,
            "base_variant": f.base_variant, "training": json.loads(f.metadata["training"])
            if "training" in f.metadata else None}


def merge(base: str, adapter: str, out: str, scale: float = 1.0) -> Path:
    """A new checkpoint folder holding base + scale * LoRA (the base folder is only read)."""
    from ..checkpoint import read_studio_meta, save_checkpoint
    from ..convert import load_any
    from .apply import adapters_applied, attached_adapters, merge_adapter
    from .io import base_state_dict, load_adapter_file

    if Path(out).exists():
        raise ValueError(f"output folder {out} already exists; choose a new one (merge never overwrites)")
    f = load_adapter_file(adapter)
    if f.spec.kind != "lora":
        raise ValueError(f"only LoRA adapters can be merged; {adapter} is a {f.spec.kind} adapter (apply it at "
                         "sampling time with --adapter instead)")
    model, _ = load_any(base, device="cpu")
    with adapters_applied(model, [(f, scale)]):
        merge_adapter(model, next(iter(attached_adapters(model))))
        merged = {k: v.clone() for k, v in base_state_dict(model).items()}
    target, _ = load_any(base, device="cpu")
    target.load_state_dict(merged)
    meta = read_studio_meta(base) if Path(base).is_dir() else {}
    meta["merged_adapter"] = {"file": f.name, "sha256": f.file_hash, "scale": scale, "base": str(base)}
    return save_checkpoint(target, out, meta)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit.adapters", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="print an adapter file's metadata as JSON")
    i.add_argument("file")
    m = sub.add_parser("merge", help="write BASE + LoRA as a new checkpoint folder")
    m.add_argument("base")
    m.add_argument("adapter")
    m.add_argument("out")
    m.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        if args.command == "info":
            print(json.dumps(info(args.file), indent=2))
        else:
            print(f"wrote {merge(args.base, args.adapter, args.out, args.scale)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
