"""Stage 1 of grafting: activation distillation (Chandrasegaran et al. 2025, Sec. "Stage 1"; reference notes B.2).

1. `record_activations`: the frozen source model runs on real data at one random timestep per sample,
   a share of the samples with the null label (unconditional, for CFG); for every unit (`replace.Unit`)
   the unit's input, the conditioning vector c and the original unit's residual update are kept - in
   memory or in fp16 memory-mapped files on disk (`cache_dir`), with the size printed before recording.
   Every unit sees the ORIGINAL model's inputs (nothing is chained), as the paper.
2. `distill_units`: each new operator is trained alone to regress its original's update (L1 default; L2,
   Huber), all units in one pass over the cache (one minibatch of cached samples feeds every unit; the
   losses are independent, so one backward of their sum trains each unit exactly as alone; gradients are
   clipped per unit), AdamW with warm-up and cosine decay, a progress bar, and an error table on held-out
   cached samples before and after.
3. `save_stage1` / `load_stage1`: the trained unit weights as safetensors with the source's fingerprint;
   loading checks every key and shape both ways and fails naming the key (the reference release silently
   left random weights - reference notes B.7).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import BlockContext
from ..model import DiT
from .replace import GraftError, Unit, unit_forward, unit_module

LOSSES = ("l1", "l2", "huber")
STAGE1_FORMAT = "dit-graft-stage1/1"
FP16_MAX = 65504.0


def source_fingerprint(weights_path: str | os.PathLike) -> str:
    """sha256 of the source's weights file (identifies the model a stage-1 file was made from)."""
    digest = hashlib.sha256()
    with open(weights_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- cache
class ActivationCache:
    """Per unit: inputs (N, T, D) and targets (N, T, D) in fp16, c (N, D) in fp32; in memory or memory-mapped."""

    def __init__(self, units: Sequence[Unit], n: int, tokens: int, dim: int, cache_dir: str | os.PathLike | None):
        self.units, self.n, self.tokens, self.dim = list(units), int(n), int(tokens), int(dim)
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        for unit in self.units:
            shapes = {"x": ((n, tokens, dim), np.float16), "target": ((n, tokens, dim), np.float16),
                      "c": ((n, dim), np.float32)}
            store = {}
            for key, (shape, dtype) in shapes.items():
                if cache_dir is None:
                    store[key] = np.zeros(shape, dtype=dtype)
                else:
                    Path(cache_dir).mkdir(parents=True, exist_ok=True)
                    store[key] = np.lib.format.open_memmap(str(Path(cache_dir) / f"{unit.name}-{key}.npy"),
                                                           mode="w+", dtype=dtype, shape=shape)
            self.arrays[unit.name] = store

    @staticmethod
    def estimate_bytes(units: int, n: int, tokens: int, dim: int) -> int:
        return int(units * n * (2 * tokens * dim * 2 + dim * 4))

    def put(self, unit: Unit, start: int, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor) -> None:
        peak = max(float(x.abs().max()), float(target.abs().max()))
        if peak > FP16_MAX:
            raise GraftError(f"activations of unit {unit.name} reach {peak:.3g}, beyond fp16's range; this model "
                             "cannot be cached in fp16 (graft fewer / other layers)")
        end = start + x.shape[0]
        store = self.arrays[unit.name]
        store["x"][start:end] = x.detach().to(torch.float16).cpu().numpy()
        store["target"][start:end] = target.detach().to(torch.float16).cpu().numpy()
        store["c"][start:end] = c.detach().float().cpu().numpy()

    def get(self, unit: Unit, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
        store = self.arrays[unit.name]
        index = np.sort(index)
        return tuple(torch.from_numpy(np.ascontiguousarray(store[k][index])).to(device=device, dtype=torch.float32)
                     for k in ("x", "c", "target"))


@torch.no_grad()
def record_activations(source: DiT, units: Sequence[Unit], images: torch.Tensor, labels: torch.Tensor,
                       objective: Any, num_samples: int, uncond_fraction: float = 0.3, batch_size: int = 64,
                       cache_dir: str | os.PathLike | None = None, max_memory_gb: float = 4.0, seed: int = 0,
                       progress: bool = True, log: Callable[[str], None] = print) -> ActivationCache:
    """Run the frozen source on `num_samples` real samples (random timesteps, a share unconditional) and cache
    every unit's input, c and original update (see the module doc)."""
    from tqdm.auto import tqdm

    device = next(source.parameters()).device
    source = source.eval()
    p = source.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    tokens, dim = grid[0] * grid[1], int(source.config.hidden_size)
    size = ActivationCache.estimate_bytes(len(units), num_samples, tokens, dim)
    where = f"fp16 memory-mapped files in {cache_dir}" if cache_dir else "memory (fp16)"
    log(f"stage 1: caching {num_samples} samples x {len(units)} unit(s) x {tokens} tokens x {dim} channels "
        f"(inputs + targets) = {size / 2**30:.2f} GiB in {where}")
    if cache_dir is None and size > max_memory_gb * 2**30:
        raise GraftError(f"the stage-1 cache needs {size / 2**30:.2f} GiB, more than --max-cache-gb {max_memory_gb}; "
                         "pass --cache-dir DIR (fp16 on disk), fewer --stage1-samples, or a larger --max-cache-gb")
    cache = ActivationCache(units, num_samples, tokens, dim, cache_dir)
    gen = torch.Generator().manual_seed(seed)
    null = int(source.config.num_classes)
    wanted: dict[int, list[Unit]] = {}
    for unit in units:
        wanted.setdefault(unit.source_blocks[0], []).append(unit)
    state: dict[str, Any] = {}

    def hook(block_index: int) -> Callable[..., None]:
        def run(block: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x, c, ctx = args[:3]
            for unit in wanted.get(block_index, []):
                if unit.kind == "attn":
                    x_in, target = x, block.attention_branch(x, c, ctx) - x
                elif unit.kind == "mlp":
                    x_in = block.attention_branch(x, c, ctx)
                    target = block.mlp_update(x_in, c, ctx)
                else:
                    nxt = source.blocks[unit.source_blocks[1]]
                    x_in, target = x, nxt.forward(block.forward(x, c, ctx), c, ctx) - x  # .forward: no hooks
                cache.put(unit, state["start"], x_in, c, target)
        return run

    handles = [source.blocks[i].register_forward_pre_hook(hook(i)) for i in wanted]
    try:
        bar = tqdm(total=num_samples, desc="stage 1: recording", disable=not progress, dynamic_ncols=True)
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            idx = torch.randint(0, len(images), (n,), generator=gen)
            x0 = images[idx].to(device)
            y = labels[idx].to(device).clone()
            y[torch.rand(n, generator=gen).to(device) < uncond_fraction] = null
            noise = torch.randn(x0.shape, generator=gen).to(device=device, dtype=x0.dtype)
            if hasattr(objective, "sample_sigmas"):
                batch = objective.noise(x0, torch.rand(n, generator=gen).to(device), noise)
            else:
                batch = objective.noise(x0, torch.randint(0, objective.num_timesteps, (n,), generator=gen).to(device),
                                        noise)
            state["start"] = start
            source(batch.x_t, batch.t, y)
            bar.update(n)
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return cache


# ---------------------------------------------------------------------------------------------- training
def regression_loss(pred: torch.Tensor, target: torch.Tensor, loss: str, huber_delta: float = 1.0) -> torch.Tensor:
    if loss == "l1":
        return F.l1_loss(pred, target)
    if loss == "l2":
        return F.mse_loss(pred, target)
    if loss == "huber":
        return F.huber_loss(pred, target, delta=huber_delta)
    raise GraftError(f"--stage1-loss must be one of {', '.join(LOSSES)}, got {loss!r}")


@torch.no_grad()
def unit_errors(model: DiT, units: Sequence[Unit], cache: ActivationCache, index: np.ndarray, grid: tuple[int, int],
                batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per unit on the cached samples `index`: relative L1 (sum |pred - target| / sum |target|), MSE, L1."""
    device = next(model.parameters()).device
    out = {}
    for unit in units:
        abs_err = abs_ref = sq = count = 0.0
        for start in range(0, len(index), batch_size):
            x, c, target = cache.get(unit, index[start:start + batch_size], device)
            pred = unit_forward(model, unit, x, c, BlockContext(grid=grid))
            abs_err += float((pred - target).abs().sum())
            abs_ref += float(target.abs().sum())
            sq += float(((pred - target) ** 2).sum())
            count += target.numel()
        out[unit.name] = {"relative_l1": abs_err / max(abs_ref, 1e-12), "mse": sq / count, "l1": abs_err / count}
    return out


def distill_units(model: DiT, units: Sequence[Unit], cache: ActivationCache, grid: tuple[int, int], steps: int,
                  batch_size: int = 64, lr: float = 1e-3, loss: str = "l1", huber_delta: float = 1.0,
                  grad_clip: float = 10.0, val_fraction: float = 0.1, seed: int = 0, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every unit's new operator alone on the cache (see the module doc); returns the error table."""
    from tqdm.auto import tqdm

    if loss not in LOSSES:
        raise GraftError(f"--stage1-loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    order = rng.permutation(cache.n)
    n_val = max(1, int(round(cache.n * val_fraction))) if cache.n > 1 else 0
    val, train = order[:n_val], order[n_val:] if cache.n > 1 else order
    before = unit_errors(model, units, cache, val if n_val else train, grid)
    model.requires_grad_(False)
    params = {u.name: [p for p in unit_module(model, u).parameters()] for u in units}
    for plist in params.values():
        for p in plist:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": v} for v in params.values()], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_factor(s: int) -> float:  # linear warm-up, cosine decay to 10%
        return min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(range(steps), desc="stage 1: distilling", disable=not progress, dynamic_ncols=True)
    last: dict[str, float] = {}
    for step in bar:
        index = rng.choice(train, size=min(batch_size, len(train)), replace=False)
        total = torch.zeros((), device=device)
        for unit in units:
            x, c, target = cache.get(unit, index, device)
            value = regression_loss(unit_forward(model, unit, x, c, BlockContext(grid=grid)), target, loss, huber_delta)
            total = total + value
            last[unit.name] = float(value.detach())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        for plist in params.values():
            torch.nn.utils.clip_grad_norm_(plist, grad_clip)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{float(total.detach()) / len(units):.4f}")
    model.eval()
    model.requires_grad_(True)
    after = unit_errors(model, units, cache, val if n_val else train, grid)
    table = [{"unit": u.name, "kind": u.kind, "block": u.block, "source_blocks": list(u.source_blocks),
              "before": before[u.name], "after": after[u.name], "last_train_loss": last.get(u.name)}
             for u in units]
    log(format_error_table(table))
    return {"loss": loss, "steps": steps, "batch_size": batch_size, "lr": lr, "samples": cache.n,
            "held_out_samples": int(n_val), "units": table}


def format_error_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["stage 1: per-unit error on held-out cached samples (relative L1 = sum|pred - orig| / sum|orig|)",
             f"{'unit':<8} {'rel. L1 before':>15} {'rel. L1 after':>14} {'MSE before':>11} {'MSE after':>10}"]
    for r in rows:
        lines.append(f"{r['unit']:<8} {r['before']['relative_l1']:>15.4f} {r['after']['relative_l1']:>14.4f} "
                     f"{r['before']['mse']:>11.3e} {r['after']['mse']:>10.3e}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- stage-1 file
def unit_keys(model: DiT, units: Sequence[Unit]) -> list[str]:
    """State-dict keys of the units' weights (what a stage-1 file must hold)."""
    keys = []
    for unit in units:
        keys.extend(unit.prefix + k for k in unit_module(model, unit).state_dict())
    return keys


def save_stage1(model: DiT, units: Sequence[Unit], path: str | os.PathLike, fingerprint: str,
                config: dict[str, Any], errors: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors = {k: state[k].detach().contiguous().cpu() for k in unit_keys(model, units)}
    meta = {"format": STAGE1_FORMAT, "source_sha256": fingerprint,
            "units": json.dumps([{"kind": u.kind, "block": u.block, "source_blocks": list(u.source_blocks)}
                                 for u in units]),
            "config": json.dumps(config, default=str)}
    if errors is not None:
        meta["errors"] = json.dumps(errors, default=str)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_stage1(model: DiT, units: Sequence[Unit], path: str | os.PathLike,
                fingerprint: str | None = None) -> list[str]:
    """Load a stage-1 file into the grafted model; every key must load and every unit weight must be present.

    Raises `GraftError` naming the offending keys (missing, unexpected, mis-shaped) or the other source.
    Returns the loaded keys.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GraftError(f"stage-1 file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != STAGE1_FORMAT:
        raise GraftError(f"{path} is not a stage-1 file of dit.graft (format {meta.get('format')!r})")
    if fingerprint is not None and meta.get("source_sha256") != fingerprint:
        raise GraftError(f"stage-1 file {path} was made from another model (source sha256 "
                         f"{str(meta.get('source_sha256'))[:12]}..., this source {fingerprint[:12]}...); "
                         "run stage 1 again for this checkpoint")
    own = model.state_dict()
    needed = set(unit_keys(model, units))
    problems = [f"unexpected key {k!r} (not in the grafted model)" for k in sorted(set(tensors) - set(own))]
    problems += [f"key {k!r}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(tensors) & set(own)) if tuple(tensors[k].shape) != tuple(own[k].shape)]
    problems += [f"missing key {k!r} (a replaced operator's weight would stay random)"
                 for k in sorted(needed - set(tensors))]
    if problems:
        raise GraftError(f"stage-1 weights in {path} do not load into the grafted model:\n  "
                         + "\n  ".join(problems[:16]))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; never continue silently
        raise GraftError(f"stage-1 keys not loaded: {result.unexpected_keys[:8]}")
    return sorted(tensors)
