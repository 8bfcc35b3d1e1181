"""The graft report (JSON + Markdown) and model card: what was replaced where, parameters, FLOPs, latency
(`dit.bench.checkpoints`) at the model's size and at 4096 tokens, quality before / after (`dit.eval` on
digits models), per-unit stage-1 error, and the compute spent relative to the source's training."""
from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..flops import model_flops
from ..model import DiT, block_attention_list, count_params, per_block

QUALITY_KEYS = ("classifier_agreement", "frechet_distance", "near_copy_rate")


def command_line(settings: Any) -> str:
    """The `python -m dit.graft` command equivalent to these settings (defaults left out)."""
    from .run import GraftSettings

    default = GraftSettings(source="", output="")
    parts = ["python", "-m", "dit.graft", settings.source, settings.output]
    for rep in settings.replace:
        parts += ["--replace", rep]
    flags = {"layers": "--layers", "restructure": "--restructure", "dynamic": "--dynamic", "options": "--options",
             "init": "--init", "stage1_file": "--stage1", "stage1_steps": "--stage1-steps",
             "stage2_steps": "--stage2-steps", "stop_after": "--stop-after", "stage1_loss": "--stage1-loss",
             "huber_delta": "--huber-delta", "stage1_samples": "--stage1-samples",
             "stage1_batch_size": "--stage1-batch-size", "stage1_lr": "--stage1-lr",
             "uncond_fraction": "--uncond-fraction", "cache_dir": "--cache-dir", "max_cache_gb": "--max-cache-gb",
             "stage2_batch_size": "--stage2-batch-size", "stage2_lr": "--stage2-lr",
             "stage2_ema_decay": "--stage2-ema-decay", "router_lr": "--router-lr", "data": "--data", "seed": "--seed",
             "eval_per_class": "--eval-per-class", "bench_tokens": "--bench-tokens", "threads": "--threads"}
    for key, flag in flags.items():
        value = getattr(settings, key)
        if value != getattr(default, key) and not (key == "layers" and not settings.replace):
            parts += [flag, str(value)]
    for key, flag in (("distill", "--distill"), ("resume", "--resume")):
        if getattr(settings, key):
            parts.append(flag)
    for key, flag in (("evaluate", "--no-eval"), ("bench", "--no-bench")):
        if not getattr(settings, key):
            parts.append(flag)
    return " ".join(shlex.quote(p) for p in parts)


def block_layout(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    depth = int(cfg["depth"])
    names = block_attention_list(cfg.get("attention", "softmax"), depth)
    mlps = per_block(cfg.get("mlp_type", "mlp"), depth, "mlp_type")
    ratios = per_block(cfg.get("mlp_ratio", 4.0), depth, "mlp_ratio", float)
    return [{"block": i, "attention": names[i], "mlp": mlps[i], "mlp_ratio": ratios[i],
             "branches": int(cfg.get("parallel_branches", 1))} for i in range(depth)]


def _quality(model: DiT, meta: dict[str, Any], per_class: int, stored: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """`dit.eval` digits metrics; a stored eval.json of the same model with the same sampling settings is reused."""
    import json
    from pathlib import Path

    from ..eval import evaluate_digits

    if stored and Path(stored).is_file():
        saved = json.loads(Path(stored).read_text())
        s = saved.get("sampling", {})
        same = (s.get("scheduler") == meta.get("default_scheduler") and s.get("steps") == meta.get("default_steps")
                and s.get("cfg_scale") == meta.get("default_cfg_scale") and s.get("seed") == 0
                and s.get("num_per_class") == per_class)
        if same and "classifier_agreement" in saved:
            return {**saved, "reused_from": str(stored)}
    return evaluate_digits(model, meta, num_per_class=per_class, progress=progress)


def _compute(src_flops: float, graft_flops: float, unit_flops: float, src_train: dict[str, Any],
             stage1: dict[str, Any], stage2: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Training compute (forward + backward ~ 3 forwards) in multiply-adds, and steps, vs the source's training."""
    steps, batch = src_train.get("steps"), src_train.get("batch_size") or 32
    source = 3 * src_flops * steps * batch * (src_train.get("num_processes") or 1) if steps else None
    s1_steps, s2_steps = int(stage1.get("steps") or 0), int(stage2.get("steps") or 0)
    record = src_flops * int(stage1.get("samples") or 0) * 1.5  # the source forward + the units' recomputation
    s1 = record + 3 * unit_flops * s1_steps * int(stage1.get("batch_size") or 0)
    s2_batch = int(stage2.get("batch_size") or 0)
    s2 = 3 * graft_flops * s2_steps * s2_batch + (src_flops * s2_steps * s2_batch if stage2.get("distill_from_source")
                                                  else 0.0)
    out = {"source_training_steps": steps, "source_batch_size": batch, "stage1_steps": s1_steps,
           "stage2_steps": s2_steps, "graft_steps": s1_steps + s2_steps,
           "steps_relative_to_source": (s1_steps + s2_steps) / steps if steps else None,
           "stage1_macs": s1, "stage2_macs": s2, "source_training_macs": source,
           "macs_relative_to_source": (s1 + s2) / source if source else None,
           "seconds": {"stage1": stage1.get("seconds"), "stage2": stage2.get("seconds")}}
    return out


def build_report(settings: Any, source: DiT, final: DiT, meta: dict[str, Any], cfg: dict[str, Any],
                 layers: Sequence[int], replacements: Sequence[Any], units: Sequence[Any],
                 init_info: dict[str, list[str]], stage1: dict[str, Any], stage2: dict[str, Any],
                 src_train: dict[str, Any], budget: int | None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    side = int(cfg["input_size"]) // int(cfg["patch_size"])
    own_tokens = side * side
    big = int(settings.bench_tokens)
    flops = {}
    for name, model in (("source", source), ("grafted", final)):
        flops[name] = {"model_size_gflops": model_flops(model)["gflops"],
                       f"tokens_{big}_gflops": model_flops(model, tokens=big)["gflops"]}
    unit_flops = 0.0
    per_block_flops = model_flops(final)["blocks"]
    for u in units:
        b = per_block_flops[u.block]
        unit_flops += {"attn": b["attention_flops"], "mlp": b["mlp_flops"], "pair": b["total"]}[u.kind]
    report: dict[str, Any] = {
        "command": command_line(settings),
        "source": str(settings.source),
        "what": ([str(r) for r in replacements] if replacements else
                 ["restructure=parallel"] if settings.restructure else [f"dynamic={cfg.get('dynamic')}"]),
        "layers": list(layers),
        "layout": {"source": block_layout({k: v for k, v in source.config.items()}), "grafted": block_layout(cfg)},
        "depth": {"source": int(source.config.depth), "grafted": int(cfg["depth"]),
                  "branches": int(cfg.get("parallel_branches", 1))},
        "init": {"mode": settings.init, "inherited": len(init_info["inherited"]), "fresh": init_info["fresh"]},
        "params": {"source": count_params(source), "grafted": count_params(final)},
        "flops": flops,
        "stage1": stage1,
        "stage2": stage2,
        "budget_steps": budget,
        "compute": _compute(flops["source"]["model_size_gflops"] * 1e9, flops["grafted"]["model_size_gflops"] * 1e9,
                            unit_flops, src_train, stage1, stage2, settings),
    }
    if settings.bench:
        from ..bench.checkpoints import compare

        log(f"latency: forwards at {own_tokens} and {big} tokens (dit.bench.checkpoints) ...")
        models = {"source": source.eval(), "grafted": final.eval()}
        rows = compare(models, [own_tokens], batch=16, repeats=7) + compare(models, [big], batch=1, repeats=3)
        report["latency"] = {"rows": rows, "threads": torch.get_num_threads(),
                             "method": "best of N no-grad forwards, interleaved (dit.bench.checkpoints.compare)"}
    if settings.evaluate:
        if str(meta.get("data", "")).startswith("digits"):
            per = settings.eval_per_class
            log(f"quality: dit.eval on the source and the grafted model, {per} images per class each "
                f"(minutes on a CPU: --eval-per-class 5 for a quick look, --no-eval to skip) ...")
            stored = str(Path(settings.source) / "eval.json")
            if final.config.dynamic:
                from ..dynamic import reset_dynamic_stats

                reset_dynamic_stats(final)
            report["quality"] = {"source": _quality(source, meta, settings.eval_per_class, stored, settings.progress),
                                 "grafted": _quality(final, meta, settings.eval_per_class, progress=settings.progress)}
            if final.config.dynamic:
                report["dynamic"] = dynamic_flops(final)
        else:
            report["quality"] = {"note": "not a digits model: sample both with sample.py and compare folders with "
                                         "python -m dit.eval --fake DIR --real DIR"}
    return report


def dynamic_flops(model: DiT) -> dict[str, Any]:
    """Block-FLOPs ratio a DyDiT model used over the forwards since its stats were reset (the evaluation's
    sampling): per layer active heads x F_attn + active groups x kept tokens x F_mlp, over the full blocks."""
    from ..dynamic import dynamic_stats

    rows = dynamic_stats(model)
    blocks = model_flops(model)["blocks"]
    used = sum(r["heads"] * b["attention_flops"] + r["groups"] * r["tokens"] * b["mlp_flops"]
               for r, b in zip(rows, blocks))
    full = sum(b["attention_flops"] + b["mlp_flops"] for b in blocks)
    return {"block_flops_ratio": used / full, "target": model.config.dynamic.get("target"), "layers": rows}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "-"
    return str(v)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, source, grafted) rows of the headline table."""
    rows = [("blocks (x branches)", str(report["depth"]["source"]),
             f"{report['depth']['grafted']} x {report['depth']['branches']}"),
            ("parameters", f"{report['params']['source'] / 1e6:.3f} M", f"{report['params']['grafted'] / 1e6:.3f} M")]
    f = report["flops"]
    big = [k for k in f["source"] if k.startswith("tokens_")][0]
    rows.append(("GFLOPs at model size", _fmt(f["source"]["model_size_gflops"], 4),
                 _fmt(f["grafted"]["model_size_gflops"], 4)))
    rows.append((f"GFLOPs at {big.split('_')[1]} tokens", _fmt(f["source"][big], 2), _fmt(f["grafted"][big], 2)))
    for r in report.get("latency", {}).get("rows", []):
        if r["model"] == "grafted":
            src = next(x for x in report["latency"]["rows"] if x["model"] == "source" and x["tokens"] == r["tokens"])
            rows.append((f"latency, {r['tokens']} tokens, batch {r['batch']} (ms)", _fmt(src["best_ms"], 1),
                         f"{_fmt(r['best_ms'], 1)} ({r['latency_ratio']:.2f}x)"))
    if "dynamic" in report:
        rows.append(("block FLOPs used while sampling (DyDiT)", "100 %",
                     f"{100 * report['dynamic']['block_flops_ratio']:.1f} % (target {report['dynamic']['target']})"))
    q = report.get("quality", {})
    if "grafted" in q:
        for key in QUALITY_KEYS:
            rows.append((key.replace("_", " "), _fmt(q["source"].get(key), 3), _fmt(q["grafted"].get(key), 3)))
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Graft report: {', '.join(report['what'])}", "",
             f"Source `{report['source']}`; blocks replaced: {report['layers'] or '-'}.", "",
             "```", report["command"], "```", "", "| | source | grafted |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    c = report["compute"]
    lines += ["", "## Compute", "",
              f"Stage 1: {c['stage1_steps']} steps, stage 2: {c['stage2_steps']} steps; "
              f"{c['graft_steps']} steps in all = "
              f"{_fmt(c['steps_relative_to_source'] and 100 * c['steps_relative_to_source'], 1)}% "
              f"of the source's {c['source_training_steps']} training steps; "
              f"{_fmt(c['macs_relative_to_source'] and 100 * c['macs_relative_to_source'], 2)}% of its training "
              "multiply-adds (forward + backward = 3 forwards; stage 1 counts the recording forwards).",
              f"Wall-clock: stage 1 {_fmt(c['seconds']['stage1'], 0)} s, stage 2 {_fmt(c['seconds']['stage2'], 0)} s."]
    units = report["stage1"].get("units")
    if units:
        lines += ["", "## Stage 1: per-unit error (held-out cached samples)", "",
                  f"Loss {report['stage1']['loss']}, {report['stage1']['steps']} steps, batch "
                  f"{report['stage1']['batch_size']}, {report['stage1']['samples']} cached samples.", "",
                  "| unit | relative L1 before | after | MSE before | after |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {u['unit']} | {u['before']['relative_l1']:.4f} | {u['after']['relative_l1']:.4f} | "
                  f"{u['before']['mse']:.3e} | {u['after']['mse']:.3e} |" for u in units]
    elif report["stage1"].get("loaded_from"):
        lines += ["", f"Stage-1 weights loaded from `{report['stage1']['loaded_from']}`."]
    if report["stage2"].get("command"):
        lines += ["", "## Stage 2 (train.py)", "", "```", report["stage2"]["command"], "```"]
    layout = report["layout"]["grafted"]
    lines += ["", "## Layout", "", "| block | attention | MLP | ratio | branches |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {b['block']} | {b['attention']} | {b['mlp']} | {b['mlp_ratio']:g} | {b['branches']} |"
              for b in layout]
    return "\n".join(lines) + "\n"


def model_card(report: dict[str, Any]) -> str:
    lines = [f"# Grafted DiT: {', '.join(report['what'])}", "",
             f"Made from `{report['source']}` by `dit.graft` (grafting, Chandrasegaran et al. 2025: operator "
             "replacement, stage-1 activation distillation, stage-2 fine-tune).", "",
             "Reproduce:", "", "```", report["command"], "```", "",
             "Sample:", "", "```", f"python sample.py --checkpoint {report['command'].split()[4]}", "```", "",
             "| | source | grafted |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(report)]
    q = report.get("quality", {})
    if "grafted" in q:
        s = q["grafted"].get("sampling", {})
        lines += ["", f"Quality: `dit.eval` digits metrics, {s.get('num_per_class')} images per class, "
                      f"{s.get('scheduler')} {s.get('steps')} steps, cfg {s.get('cfg_scale')}, seed {s.get('seed')} "
                      "(classifier agreement: share of samples an independent classifier assigns to the asked class; "
                      "Fréchet distance in a PCA feature space of real digits)."]
    lines += ["", "Full details: `graft_report.md` / `graft_report.json`."]
    return "\n".join(lines) + "\n"
