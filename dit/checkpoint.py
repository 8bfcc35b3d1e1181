"""Studio checkpoint folders: written atomically, checked key by key before loading.

A folder holds `config.json` + `diffusion_pytorch_model.safetensors` (diffusers' `save_pretrained`
layout), `studio.json` (objective, sampling defaults, class names) and optionally `model_card.md`.
Quantized weights and adapters sit beside them in files named for what they are.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

STUDIO_FILE = "studio.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")

DEFAULT_STUDIO: dict[str, Any] = {
    "objective": "ddpm",          # ddpm (eps, learned sigma when the model has it) | flow (rectified flow velocity)
    "default_scheduler": "ddpm",
    "default_steps": 250,
    "default_cfg_scale": 4.0,
    "class_names": None,
    "vae": None,                   # a local diffusers AutoencoderKL folder for latent models
    "latent_scale": 0.18215,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the fix."""


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir`; a good old folder is only removed after the move."""
    final_dir = Path(final_dir)
    backup = None
    if final_dir.exists():
        backup = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(final_dir, backup)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        if backup is not None:
            os.replace(backup, final_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def make_temp_dir(final_dir: str | os.PathLike) -> Path:
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: the renamed folder should read like any other
    return tmp


@contextlib.contextmanager
def atomic_folder(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `final_dir`; on success it becomes `final_dir`, on any error it is removed."""
    tmp = make_temp_dir(final_dir)
    try:
        yield tmp
        atomic_replace_dir(tmp, Path(final_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: torch.nn.Module, folder: str | os.PathLike, studio: dict[str, Any] | None = None,
                    model_card: str | None = None, extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename). Returns the folder."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        meta = dict(DEFAULT_STUDIO)
        meta.update(studio or {})
        (tmp / STUDIO_FILE).write_text(json.dumps(meta, indent=2))
        if model_card:
            (tmp / "model_card.md").write_text(model_card)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    return folder


def read_studio_meta(folder: str | os.PathLike) -> dict[str, Any]:
    meta = dict(DEFAULT_STUDIO)
    path = Path(folder) / STUDIO_FILE
    if path.exists():
        meta.update(json.loads(path.read_text()))
    return meta


def weights_file(folder: str | os.PathLike) -> Path:
    for name in WEIGHT_FILES:
        if (Path(folder) / name).exists():
            return Path(folder) / name
    raise CheckpointError(f"{folder} has no weights file ({' or '.join(WEIGHT_FILES)}); "
                          "is this a studio checkpoint folder written by save_pretrained / train.py?")


def describe_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Human-readable lines for missing, unexpected and mis-shaped keys."""
    lines = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}"
                     f"{' ...' if len(unexpected) > 12 else ''}")
    for k in shapes[:12]:
        lines.append(f"shape mismatch for {k}: checkpoint {tuple(found[k])} vs config {tuple(expected[k])}")
    return lines


def check_checkpoint_folder(folder: Any, cls: type) -> None:
    """Raise `CheckpointError` naming every key/shape the weights and config.json disagree on."""
    folder = Path(str(folder))
    if not folder.is_dir():
        return  # hub ids and files are left to the caller (the studio never downloads)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json; not a checkpoint folder")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") not in (None, cls.__name__):
        raise CheckpointError(f"{folder} holds a {config.get('_class_name')} model, not a studio {cls.__name__}; "
                              "convert it first: python -m dit.convert SRC OUT")
    init_keys = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(init_keys)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(weights_file(folder)), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = describe_mismatch(expected, found)
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match its config.json:\n  " + "\n  ".join(problems)
                              + "\nFix: use the config.json written with these weights, or re-export the model.")
