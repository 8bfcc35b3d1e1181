"""The quantization report: `quant_report.json` (everything) and `quant_report.md` (tables) in OUT."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 else f"{v:.{digits}f}"
    return str(v)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_report(r: dict[str, Any]) -> str:
    """Markdown: summary, quality before/after, per-block and per-layer errors."""
    b, cal = r["bytes"], r["calibration"]
    grid = r["grid"].upper()
    lines = [f"# Quantization report: {r['preset']} ({grid})", "",
             f"- source: `{r['source']}` -> `{r['output']}`",
             f"- formats: {', '.join(f'{k} {v}' for k, v in r['formats'].items())}",
             f"- file: {_mb(b['source_file'])} -> {_mb(b['quantized_file'])} (**{b['file_ratio']:.3f}x**)",
             f"- weights in memory: {_mb(b['source_in_memory'])} -> {_mb(b['quantized_in_memory'])} "
             f"({b['memory_ratio']:.3f}x)",
             f"- calibration: {cal['inputs']} denoiser inputs, trajectories {cal['trajectory_seconds']} s, "
             f"calibration {cal['calibration_seconds']} s, total {cal['total_seconds']} s"]
    if r.get("command"):
        lines.append(f"- command: `{r['command']}`")
    q = r.get("quality")
    if q and "before" in q:
        lines += ["", f"## Quality ({q['metric']}, {q['num_per_class']} images per class)", "",
                  "| model | classifier agreement | Fréchet distance (real floor) |", "|---|---|---|"]
        for name, d in (("float32", q["before"]), (f"{r['preset']} {grid}", q["after"])):
            lines.append(f"| {name} | {100 * d['classifier_agreement']:.1f} % | {_f(d['frechet_distance'], 3)} "
                         f"({_f(d.get('frechet_floor_train_vs_test'), 3)}) |")
        lines.append(f"\nagreement drop: {q['agreement_drop_points']:.1f} points")
    elif q:
        lines += ["", f"Quality: {q.get('skipped')}"]
    lines += ["", "## Blocks (output MSE on the calibration inputs)", "",
              "| block | round to nearest | after AdaRound | relative error |", "|---|---|---|---|"]
    for name, s in r["blocks"].items():
        if s.get("rtn_output_mse") is None:  # no AdaRound in this block (8-bit layers, --iters 0): the final
            rtn, ada = _f(s["output_mse"]), "not run"  # error IS the round-to-nearest one
        else:
            rtn, ada = _f(s["rtn_output_mse"]), _f(s["output_mse"])
        lines.append(f"| {name} | {rtn} | {ada} | {_f(s['relative_error'])} |")
    lines += ["", "## Layers", "", "| layer | role | weight | scales | act | weight rel. error | output rel. error |",
              "|---|---|---|---|---|---|---|"]
    for name, s in r["layers"].items():
        gran = f"group {s['group_size']}" if s["granularity"] == "group" else s["granularity"]
        lines.append(f"| {name} | {s['role']} | {s['format']} | {gran} | {s['act'] or '-'} | "
                     f"{_f(s['weight_rel_error'])} | {_f(s['output_rel_error'])} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    j, m = out / "quant_report.json", out / "quant_report.md"
    _atomic_write(j, json.dumps(report, indent=2, default=str))
    _atomic_write(m, format_report(report))
    return j, m
