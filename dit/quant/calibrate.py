"""Post-training quantization of a DiT, block by block, on inputs recorded along real sampling trajectories.

1. `record_trajectories`: the studio's own sampler (`dit.schedulers.sample`, the checkpoint's default
   scheduler, steps and CFG) runs on `calib_samples` images (labels cycling over the classes, seeds
   0..N-1); every denoiser call is recorded, so the set holds several timesteps and both CFG halves
   (conditional and unconditional), as FP4DiT / Q-Diffusion calibrate (reference A.8).
   `calib_steps` keeps that many evenly spaced timesteps of each trajectory.
2. `quantize_model`: the inputs of block 0 are captured once; then for each block in order
   (and the final layer): float targets y = block_fp(x_fp); each quantized layer's inputs are recorded
   on the quantized chain's input x_q; its clipping maximum is searched (`search_clipping`); layers of
   <= 6 bits get scale-aware FP AdaRound on the whole block (`adaround.reconstruct`), 8-bit layers round
   to nearest; the block's layers become `QuantLinear`s (packed) and x_q advances through them.
Per-layer and per-block errors are returned for the report.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attention import BlockContext
from ..schedulers.samplers import GenerationCancelled
from .adaround import AdaRoundLinear, reconstruct
from .layers import QuantLinear, set_module
from .observers import search_clipping
from .presets import LayerPlan, QuantConfig, build_plan

MAX_SEARCH_ROWS = 4096


class _Stop(Exception):
    pass


class QuantCancelled(GenerationCancelled):
    """The job was cancelled (`cancel` was set); nothing was written."""


def _check(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise QuantCancelled("quantization cancelled; nothing was written")


@torch.no_grad()
def record_trajectories(model: nn.Module, meta: dict[str, Any], config: QuantConfig,
                        progress: bool = True, cancel: Any = None) -> dict[str, torch.Tensor]:
    """Denoiser inputs (x, t, y) of real sampling runs: (S, C, H, W), (S,), (S,)."""
    from ..checkpoint import DEFAULT_STUDIO
    from ..schedulers import sample

    meta = {**DEFAULT_STUDIO, **(meta or {})}
    cfg = model.config
    num_classes = int(cfg.num_classes)
    size = int(cfg.input_size)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recorder(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check(cancel)
        calls.append((x.detach().cpu(), t.detach().cpu(), y.detach().cpu()))
        return model(x, t, y)

    n = config.calib_samples
    labels = torch.arange(n) % num_classes
    steps = int(config.calib_sampling_steps or meta["default_steps"])
    per_batch = 32
    device = next(model.parameters()).device
    for start in tqdm(range(0, n, per_batch), desc="calibration trajectories", disable=not progress, leave=False):
        lab = labels[start:start + per_batch]
        first = len(calls)
        sample(recorder, lab, list(range(config.seed + start, config.seed + start + len(lab))),
               (int(cfg.in_channels), size, size), scheduler_name=config.calib_scheduler or meta["default_scheduler"],
               steps=steps, cfg_scale=float(config.calib_cfg_scale if config.calib_cfg_scale is not None
                                            else meta["default_cfg_scale"]),
               objective=meta["objective"], learn_sigma=bool(cfg.learn_sigma), null_class=num_classes,
               device=device, progress=False)
        batch_calls = calls[first:]
        if config.calib_steps is not None and config.calib_steps < len(batch_calls):
            k = config.calib_steps
            keep = sorted({round(i * (len(batch_calls) - 1) / max(1, k - 1)) for i in range(k)})
            del calls[first:]
            calls.extend(batch_calls[i] for i in keep)
    x = torch.cat([c[0] for c in calls])
    t = torch.cat([c[1] for c in calls])
    y = torch.cat([c[2] for c in calls])
    return {"x": x, "t": t, "y": y}


@torch.no_grad()
def _block0_inputs(model: nn.Module, data: dict[str, torch.Tensor], batch: int = 256) -> dict[str, Any]:
    """Residual stream, conditioning and timestep embedding entering block 0, for every calibration sample."""
    xs, cs, ts = [], [], []
    grid: list[tuple[int, int]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        x, c, ctx = args[:3]
        xs.append(x.detach())
        cs.append(c.detach())
        ts.append(ctx.t_emb.detach())
        grid.append(tuple(ctx.grid))
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(data["x"]), batch):
            try:
                model(data["x"][i:i + batch].to(device), data["t"][i:i + batch].to(device),
                      data["y"][i:i + batch].to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return {"x": torch.cat(xs), "c": torch.cat(cs), "t_emb": torch.cat(ts), "grid": grid[0]}


def _set_masked_execution(model: nn.Module) -> dict[nn.Module, str]:
    """DyDiT blocks run masked during calibration so every Linear is really called (slicing bypasses them)."""
    saved = {}
    for m in model.modules():
        if hasattr(m, "execution") and hasattr(m, "num_groups"):
            saved[m] = m.execution
            m.execution = "masked"
    return saved


def quantize_model(model: nn.Module, config: QuantConfig, data: dict[str, torch.Tensor],
                   progress: bool = True, callback: Any = None, cancel: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """A quantized copy of `model` (QuantLinear layers) and calibration statistics; `model` is untouched.

    `callback(done, total, desc)` is called before each block; `cancel` (a `threading.Event`) stops the work."""
    t0 = time.perf_counter()
    plan = build_plan(model, config)
    fp_model = model.eval()
    q_model = copy.deepcopy(model).eval()
    saved_fp = _set_masked_execution(fp_model)
    saved_q = _set_masked_execution(q_model)
    torch.manual_seed(config.seed)
    try:
        inputs = _block0_inputs(fp_model, data)
        stats = _calibrate_groups(fp_model, q_model, plan, config, inputs, progress, callback, cancel)
    finally:
        for m, mode in saved_fp.items():
            m.execution = mode
        for m, mode in saved_q.items():
            m.execution = mode
    for m in q_model.modules():
        if hasattr(m, "_stats") and hasattr(m, "num_groups"):
            m._stats = None
    q_model.requires_grad_(False)
    stats["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    stats["calibration_samples"] = int(len(data["x"]))
    stats["plan"] = {p.name: p.as_dict() for p in plan}
    return q_model, stats


def _calibrate_groups(fp_model: nn.Module, q_model: nn.Module, plan: list[LayerPlan], config: QuantConfig,
                      inputs: dict[str, Any], progress: bool, callback: Any = None,
                      cancel: Any = None) -> dict[str, Any]:
    grid = inputs["grid"]
    c_all, temb_all = inputs["c"], inputs["t_emb"]
    x_fp, x_q = inputs["x"], inputs["x"].clone()
    num = len(x_fp)
    names = [f"blocks.{i}" for i in range(len(fp_model.blocks))] + ["final_layer"]
    by_group: dict[str, list[LayerPlan]] = {}
    for p in plan:
        by_group.setdefault(p.group, []).append(p)
    layer_stats: dict[str, dict[str, float]] = {}
    block_stats: dict[str, dict[str, float]] = {}
    chunk = 128

    for step, gname in enumerate(tqdm(names, desc="calibrating blocks", disable=not progress)):
        _check(cancel)
        if callback is not None:
            callback(step, len(names), f"calibrating {gname}")
        fp_block = fp_model.get_submodule(gname)
        q_block = q_model.get_submodule(gname)
        is_final = gname == "final_layer"

        def call(block: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            c = c_all[idx]
            if is_final:
                return block(x, c)
            return block(x, c, BlockContext(grid=grid, t_emb=temb_all[idx]))

        def batched(block: nn.Module, x_all: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([call(block, x_all[i:i + chunk], torch.arange(i, min(i + chunk, num)))
                                  for i in range(0, num, chunk)])

        y_fp = batched(fp_block, x_fp)
        layers = by_group.get(gname, [])
        if not layers:
            x_q = batched(q_block, x_q) if not is_final else x_q
            x_fp = y_fp if not is_final else x_fp
            continue
        # 1) the inputs of every planned layer, on the quantized chain
        recorded: dict[str, list[torch.Tensor]] = {p.name: [] for p in layers}
        handles = []
        for p in layers:
            def hook(_m: nn.Module, args: tuple[Any, ...], key: str = p.name) -> None:
                a = args[0].detach().reshape(-1, args[0].shape[-1])
                recorded[key].append(a[torch.randperm(len(a))[: max(1, MAX_SEARCH_ROWS // 8)]])
            handles.append(q_model.get_submodule(p.name).register_forward_pre_hook(hook))
        sub = torch.randperm(num)[: min(num, 256)]
        with torch.no_grad():
            for i in range(0, len(sub), 32):
                call(q_block, x_q[sub[i:i + 32]], sub[i:i + 32])
        for h in handles:
            h.remove()
        xs = {k: torch.cat(v)[:MAX_SEARCH_ROWS] for k, v in recorded.items()}
        # 2) clipping search, then AdaRound (<= 6 bits) or round to nearest (8 bits)
        soft: list[tuple[LayerPlan, AdaRoundLinear]] = []
        originals = {}
        for p in layers:
            linear = q_model.get_submodule(p.name)
            originals[p.name] = linear
            scale = search_clipping(linear.weight, xs[p.name], p.spec)
            if config.adaround and config.iters > 0 and p.spec.fmt.bits <= 6:
                ada = AdaRoundLinear(linear, p.spec, scale, p.act, p.out_group, config.scale_aware)
                set_module(q_model, p.name, ada)
                soft.append((p, ada))
            else:
                set_module(q_model, p.name, QuantLinear.from_linear(linear, p.spec, scale, p.act, p.out_group))
        rtn_err = None
        if soft:
            for p, ada in soft:
                ada.soft = False  # round-to-nearest start == hard rounding of the initial V
            y_rtn = batched(q_block, x_q)
            rtn_err = float((y_rtn - y_fp).pow(2).sum(-1).mean())
            for p, ada in soft:
                ada.soft = True
            curve = reconstruct(lambda idx: call(q_block, x_q[idx], idx), [a for _, a in soft], num,
                                lambda idx: y_fp[idx], iters=config.iters, batch_size=config.batch_size,
                                lr=config.lr, round_weight=config.round_weight, warmup=config.warmup,
                                seed=config.seed, progress=progress, desc=f"AdaRound {gname}", cancel=cancel)
            for p, ada in soft:
                set_module(q_model, p.name, QuantLinear.from_values(originals[p.name], p.spec, ada.hard_values(),
                                                                    ada.stored_scale, p.act, p.out_group))
        else:
            curve = []
        # 3) errors and the next block's inputs
        y_q = batched(q_block, x_q)
        err = float((y_q - y_fp).pow(2).sum(-1).mean())
        ref = float(y_fp.pow(2).sum(-1).mean())
        block_stats[gname] = {"output_mse": err, "relative_error": err / max(ref, 1e-20),
                              "rtn_output_mse": rtn_err, "adaround_first_loss": curve[0] if curve else None,
                              "adaround_last_loss": curve[-1] if curve else None}
        for p in layers:
            w = originals[p.name].weight.detach().float()
            wq = q_model.get_submodule(p.name).dequantize()
            x = xs[p.name].float()
            out_ref = (x @ w.t()).pow(2).sum()
            layer_stats[p.name] = {
                "format": p.spec.format, "granularity": p.spec.granularity,
                "group_size": p.spec.group_size if p.spec.granularity == "group" else None,
                "act": p.act, "role": p.role,
                "weight_rel_error": float((w - wq).pow(2).sum() / w.pow(2).sum().clamp_min(1e-20)),
                "output_rel_error": float((x @ (w - wq).t()).pow(2).sum() / out_ref.clamp_min(1e-20)),
            }
        if not is_final:
            x_q, x_fp = y_q, y_fp
    return {"layers": layer_stats, "blocks": block_stats}


__all__ = ["record_trajectories", "quantize_model", "QuantCancelled"]
