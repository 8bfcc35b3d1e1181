"""Model discovery: the bundled checkpoints and every studio/diffusers folder or official `.pt` under a folder.

Only file names and `config.json` are read here (cheap; safe to rescan often); weights are loaded through
`dit.convert.load_any` when a model is used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".pt", ".pth")
MAX_DEPTH = 3


@dataclass(frozen=True)
class ModelEntry:
    id: str          # what the API takes: "dit-digits", "variants/digits-linear", "<path under the models dir>"
    path: Path
    kind: str        # studio | diffusers | diffusers-pipeline | original-pt

    @property
    def label(self) -> str:
        return self.id if self.kind == "studio" else f"{self.id} ({self.kind})"

    def mtime(self) -> float:
        files = [self.path] if self.path.is_file() else list(self.path.glob("*.safetensors")) + \
            list(self.path.glob("*/*.safetensors")) + [self.path / "config.json"]
        return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def folder_kind(folder: Path) -> str | None:
    """studio | diffusers | diffusers-pipeline for a loadable DiT folder, else None."""
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            name = json.loads(cfg.read_text()).get("_class_name")
        except (OSError, ValueError):
            return "studio"  # unreadable config: list it; loading names the problem
        if name == "DiT":
            return "studio"
        if name == "DiTTransformer2DModel":
            return "diffusers"
        return None
    if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
        return "diffusers-pipeline"
    return None


def _walk(root: Path, depth: int = 0) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    try:
        children = sorted(root.iterdir())
    except OSError:
        return found
    for child in children:
        if child.name.startswith("."):      # temp folders of atomic writes, hidden files
            continue
        if child.is_dir():
            kind = folder_kind(child)
            if kind:
                found.append((child, kind))
            elif depth + 1 < MAX_DEPTH and not (child / "train_state.json").exists():
                found += _walk(child, depth + 1)
        elif child.suffix in WEIGHT_SUFFIXES:
            found.append((child, "original-pt"))
    return found


def scan_models(models_dir: Path, bundled_dir: Path | None = None, only: Path | None = None,
                id_base: Path | None = None) -> list[ModelEntry]:
    """Bundled models first (`dit-digits`, `variants/*`), then what lies under `models_dir`."""
    entries: list[ModelEntry] = []
    seen: set[Path] = set()

    def add(path: Path, kind: str, base: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        ident = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
        if any(e.id == ident for e in entries):
            ident = f"{ident}@{len(entries)}"
        entries.append(ModelEntry(ident, path, kind))

    if only is not None:
        kind = folder_kind(only) if only.is_dir() else ("original-pt" if only.suffix in WEIGHT_SUFFIXES else None)
        if kind:
            add(only, kind, (id_base or only.parent).resolve())
        return entries
    if bundled_dir is not None and bundled_dir.is_dir():
        for path, kind in _walk(bundled_dir):
            add(path, kind, bundled_dir.resolve())
    if models_dir.is_dir():
        for path, kind in _walk(models_dir):
            add(path, kind, models_dir.resolve())
    return entries
