"""`quantize_checkpoint`: the one function behind `python -m dit.quant` and the UI's Quantize tab.

checkpoint in -> calibrated, packed, saved quantized folder out, reloaded and (for digits models)
evaluated with `dit.eval` against the float model; the report (JSON + Markdown) is written beside it.
The source is only read; an existing output folder is an error.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .presets import QuantConfig, QuantConfigError, build_plan
from .storage import QUANT_WEIGHTS, is_quantized_folder, read_quant_config

EVAL_KEYS = ("classifier_agreement", "frechet_distance", "frechet_floor_train_vs_test", "near_copy_rate",
             "num_images")


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def source_weights_bytes(src: Path) -> int:
    if src.is_file():
        return src.stat().st_size
    from ..checkpoint import weights_file

    return weights_file(src).stat().st_size


def check_request(src: str | os.PathLike, out: str | os.PathLike, config: QuantConfig) -> tuple[Path, Path]:
    """Every check that needs no model: raises `QuantConfigError` naming the fix."""
    src, out = Path(src), Path(out)
    config.validate()
    if not src.exists():
        raise QuantConfigError(f"source checkpoint {src} does not exist")
    if out.exists():
        raise QuantConfigError(f"output folder {out} already exists; choose a new OUT folder "
                               "(quantization never overwrites anything)")
    if is_quantized_folder(src):
        source = read_quant_config(src).get("source", "the float checkpoint")
        raise QuantConfigError(f"{src} is already quantized ({read_quant_config(src).get('preset')}); quantize the "
                               f"float checkpoint it was made from ({source}) instead")
    return src, out


def _baseline_eval(src: Path, model: torch.nn.Module, meta: dict[str, Any], per_class: int,
                   log: Callable[[str], None], progress: bool, baseline: str | None = None) -> dict[str, Any]:
    """The float model's digits metrics: `baseline` (a `dit.eval --out` JSON) or SRC/eval.json when made with the
    same sampling settings, else a new run (then written to `baseline` when given)."""
    from ..eval import _json_safe, evaluate_digits

    cached = Path(baseline) if baseline else (src / "eval.json" if src.is_dir() else None)
    if cached is not None and cached.exists():
        try:
            old = json.loads(cached.read_text())
            s = old.get("sampling", {})
            if (s.get("num_per_class") == per_class and s.get("seed") == 0
                    and s.get("scheduler") == meta.get("default_scheduler")
                    and s.get("steps") == meta.get("default_steps")
                    and float(s.get("cfg_scale", -1)) == float(meta.get("default_cfg_scale"))):
                log(f"float32 baseline: {cached} (same sampling settings)")
                return {**{k: old.get(k) for k in EVAL_KEYS}, "source": str(cached)}
        except (OSError, ValueError):
            pass
    log("float32 baseline: evaluating the source model")
    res = evaluate_digits(model, meta, num_per_class=per_class, progress=progress)
    if baseline and not Path(baseline).exists():
        Path(baseline).write_text(json.dumps(_json_safe(res), indent=2))
    return {**{k: res.get(k) for k in EVAL_KEYS}, "source": "evaluated now"}


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, config: QuantConfig | None = None,
                        evaluate: bool = True, eval_per_class: int = 50, progress: bool = True,
                        log: Callable[[str], None] = print, callback: Callable[[int, int, str], None] | None = None,
                        cancel: Any = None, baseline_eval: str | None = None) -> dict[str, Any]:
    """Quantize SRC into the new folder OUT; returns the report (also saved as OUT/quant_report.{json,md}).

    `callback(done, total, desc)` reports progress (blocks calibrated); `cancel` (a `threading.Event`)
    stops the work before anything is written (`QuantCancelled`)."""
    from ..convert import load_any
    from ..eval import EvalError, check_digits_model, evaluate_digits
    from .calibrate import quantize_model, record_trajectories
    from .report import write_report
    from .storage import load_quantized, save_quantized

    config = config or QuantConfig()
    src, out = check_request(src, out, config)
    t_start = time.perf_counter()
    model, meta = load_any(src)
    model = model.float().eval()
    plan = build_plan(model, config)  # group sizes etc. fail here, before any work
    formats = config.formats()
    log(f"quantizing {src} -> {out}: preset {config.preset} ({'INT' if config.int_grid else 'FP'}), "
        f"{len(plan)} layers, formats {formats}")
    t0 = time.perf_counter()
    if callback is not None:
        callback(0, 1, "recording calibration trajectories")
    data = record_trajectories(model, meta, config, progress=progress, cancel=cancel)
    record_seconds = time.perf_counter() - t0
    log(f"recorded {len(data['x'])} calibration inputs along {config.calib_samples} sampling trajectories "
        f"in {record_seconds:.1f}s")
    q_model, stats = quantize_model(model, config, data, progress=progress, callback=callback, cancel=cancel)
    studio = {k: v for k, v in meta.items() if k not in ("training", "source")}
    label = f"{config.preset}{'-int' if config.int_grid else ''}"
    studio["name"] = f"{meta.get('name') or src.name}-{label}"
    studio["quantization"] = {"preset": config.preset, "grid": "int" if config.int_grid else "fp",
                              "formats": formats, "source": str(src)}
    quant = {"preset": config.preset, "grid": "int" if config.int_grid else "fp", "formats": formats,
             "source": str(src), "keep_dtype": config.keep_dtype, "config": config.as_dict()}
    save_quantized(q_model, out, studio, quant)
    loaded = load_quantized(out)
    report: dict[str, Any] = {
        "source": str(src), "output": str(out), "preset": config.preset, "grid": quant["grid"], "formats": formats,
        "config": config.as_dict(),
        "bytes": {"source_file": source_weights_bytes(src), "quantized_file": (out / QUANT_WEIGHTS).stat().st_size,
                  "source_in_memory": model_bytes(model), "quantized_in_memory": model_bytes(loaded)},
        "calibration": {"inputs": stats["calibration_samples"], "trajectory_seconds": round(record_seconds, 1),
                        "calibration_seconds": stats["calibration_seconds"],
                        "total_seconds": None},
        "blocks": stats["blocks"], "layers": stats["layers"],
        "command": config.extra.get("command"),
    }
    b = report["bytes"]
    b["file_ratio"] = b["quantized_file"] / b["source_file"]
    b["memory_ratio"] = b["quantized_in_memory"] / b["source_in_memory"]
    if evaluate:
        try:
            check_digits_model(model, meta)
            digits = True
        except EvalError:
            digits = False
            report["quality"] = {"skipped": "not a digits model; compare samples with python -m dit.eval --fake/--real"}
        if digits:
            before = _baseline_eval(src, model, meta, eval_per_class, log, progress, baseline_eval)
            log("evaluating the quantized model (reloaded from OUT)")
            if callback is not None:
                callback(1, 1, "evaluating the quantized model")
            after_full = evaluate_digits(loaded, meta, num_per_class=eval_per_class, progress=progress)
            after = {k: after_full.get(k) for k in EVAL_KEYS}
            report["quality"] = {"metric": "dit.eval digits", "num_per_class": eval_per_class,
                                 "sampling": after_full.get("sampling"), "before": before, "after": after,
                                 "agreement_drop_points": 100 * (before["classifier_agreement"]
                                                                  - after["classifier_agreement"])}
    report["calibration"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(report, out)
    return report
