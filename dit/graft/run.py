"""The grafting pipeline behind `python -m dit.graft`: replace / restructure / add routers, stage 1, stage 2, report.

Output folder OUT (refused if it exists, unless `resume`):

    OUT/config.json, diffusion_pytorch_model.safetensors, studio.json    the grafted studio checkpoint
    OUT/model_card.md, graft_report.json, graft_report.md, eval.json     what was done and what it gave
    OUT/stage1/                                                          the model after stage 1 (a checkpoint)
    OUT/stage1/graft_stage1.safetensors                                  the stage-1 weights (+ source sha256)
    OUT/stage2/                                                          train.py's run: checkpoint-<step>/, metrics

Stage 2 is train.py itself (`dit.training.train`, Accelerate, EMA, resume, atomic checkpoints) on the source's
data with `--model OUT/stage1 --init-from OUT/stage1` (and `--teacher SOURCE` for LiT's hybrid distillation);
its exact command is in the report, so it can also be re-run alone, e.g. under `accelerate launch`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import save_checkpoint, weights_file
from ..model import DiT, count_params
from .distill import (LOSSES, distill_units, load_stage1, record_activations, save_stage1, source_fingerprint)
from .layers import parse_layers
from .replace import (GraftError, Replacement, build_grafted, check_operators, graft_config, restructure_config,
                      source_config, units_for)

STAGES = ("stage1", "stage2")
BUDGET_SHARE = 0.1       # default total budget: 10% of the source's training steps
STAGE1_SHARE = 0.2       # of which stage 1 gets this share by default
STAGE1_FILE = "graft_stage1.safetensors"


@dataclass
class GraftSettings:
    source: str
    output: str
    replace: list[str] = field(default_factory=list)
    layers: str = "all"
    restructure: str | None = None
    dynamic: str | None = None           # JSON DyDiT options: routers added to the trained model
    options: str | None = None           # JSON attention options for the new operators
    init: str = "inherit"
    stage1_file: str | None = None       # use these stage-1 weights instead of running stage 1
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    stop_after: str | None = None
    stage1_loss: str = "l1"
    huber_delta: float = 1.0
    stage1_samples: int = 2048
    stage1_batch_size: int = 64
    stage1_lr: float = 1e-3
    uncond_fraction: float = 0.3
    cache_dir: str | None = None
    max_cache_gb: float = 4.0
    stage2_batch_size: int | None = None
    stage2_lr: float = 1e-4
    stage2_ema_decay: float = 0.995
    distill: bool = False
    router_lr: float = 1e-2              # --dynamic: learning rate of the DyDiT routers in stage 2
    data: str | None = None
    seed: int = 0
    evaluate: bool = True
    eval_per_class: int = 50
    bench: bool = True
    bench_tokens: int = 4096
    resume: bool = False
    progress: bool = True
    threads: int | None = None           # torch CPU threads (set by the CLI; recorded in the report's command)


def _log(msg: str) -> None:
    print(msg, flush=True)


def source_training(meta: dict[str, Any]) -> dict[str, Any]:
    """Steps and batch of the source's training, read from its studio.json (`training.command`)."""
    info = dict(meta.get("training") or {})
    batch = None
    words = str(info.get("command", "")).split()
    for flag in ("--batch-size", "--train_batch_size"):
        if flag in words and words.index(flag) + 1 < len(words):
            batch = int(words[words.index(flag) + 1])
    return {"steps": info.get("steps"), "batch_size": batch, "num_processes": info.get("num_processes", 1),
            "command": info.get("command")}


def plan_budget(settings: GraftSettings, src_train: dict[str, Any], has_stage1: bool) -> tuple[int, int, int | None]:
    """(stage-1 steps, stage-2 steps, budget): defaults split 10% of the source's steps 20 / 80."""
    steps = src_train.get("steps")
    budget = int(round(BUDGET_SHARE * steps)) if steps else None
    s1, s2 = settings.stage1_steps, settings.stage2_steps
    if budget is None and (s2 is None or (has_stage1 and s1 is None)):
        raise GraftError("the source's studio.json does not say how many steps it was trained for, so the default "
                         "budget (10% of them) is unknown: pass --stage1-steps and --stage2-steps")
    if not has_stage1:
        s1 = 0
    elif s1 is None:
        s1 = max(1, int(round(STAGE1_SHARE * budget))) if s2 is None else max(1, budget - s2)
    if s2 is None:
        s2 = max(0, budget - s1)
    if settings.stop_after == "stage1":
        s2 = 0
    if s1 < 0 or s2 < 0:
        raise GraftError("--stage1-steps and --stage2-steps must be >= 0")
    return int(s1), int(s2), budget


def load_source(path: str) -> tuple[DiT, dict[str, Any], str]:
    from ..convert import load_any

    if not Path(path).is_dir():
        raise GraftError(f"source {path!r} is not a studio checkpoint folder (convert it first: python -m dit.convert)")
    model, meta = load_any(path, device="cpu")
    try:
        fingerprint = source_fingerprint(weights_file(path))
    except (OSError, ValueError) as err:
        raise GraftError(f"cannot read the source weights of {path}: {err}") from err
    return model.eval().requires_grad_(False), dict(meta), fingerprint


def stage1_dataset(data: str, meta: dict[str, Any], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images (or cached latents) and labels of the source's data for stage 1."""
    from ..data import DIGITS_DATASETS, load_digits_dataset

    if data in DIGITS_DATASETS:
        return load_digits_dataset(data, "train", size=size)
    if not Path(data).is_dir():
        raise GraftError(f"stage-1 data {data!r} is neither an embedded dataset ({', '.join(DIGITS_DATASETS)}) nor a "
                         "folder of images; pass --data")
    if meta.get("vae"):
        raise GraftError("stage 1 on a latent (VAE) model needs its cached latents; run stage 2 only "
                         "(--stage1-steps 0) or graft from a pixel-space model")
    from ..data import ImageFolderDataset

    ds = ImageFolderDataset(data, size, 3)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.as_tensor(ys)


def stage2_args(settings: GraftSettings, start: Path, out: Path, meta: dict[str, Any], cfg: dict[str, Any],
                steps: int, data: str, batch: int) -> list[str]:
    """train.py arguments of stage 2 (the fine-tune of the grafted model)."""
    args = ["--data", data, "--model", str(start), "--init-from", str(start),
            "--objective", str(meta.get("objective", "ddpm")),
            "--learn-sigma" if cfg.get("learn_sigma") else "--no-learn-sigma",
            "--class-dropout", str(cfg.get("class_dropout_prob", 0.1)),
            "--max-steps", str(steps), "--batch-size", str(batch), "--lr", str(settings.stage2_lr),
            "--lr-warmup-steps", str(max(1, min(100, steps // 10))), "--ema-decay", str(settings.stage2_ema_decay),
            "--checkpointing-steps", str(max(1, steps // 4)), "--seed", str(settings.seed),
            "--sample-scheduler", str(meta.get("default_scheduler")), "--sample-steps", str(meta.get("default_steps")),
            "--sample-cfg-scale", str(meta.get("default_cfg_scale")), "--output-dir", str(out / "stage2"),
            "--export-dir", str(out / "stage2" / "final"), "--resume-from", "latest", "--report-to", "none",
            "--log-every", str(max(1, min(50, steps // 10)))]
    if meta.get("vae"):
        args += ["--vae", str(meta["vae"])]
    if settings.evaluate:  # the report's evaluation samples the model anyway
        args.append("--no-preview")
    if settings.distill:
        args += ["--teacher", str(settings.source)]
    if cfg.get("dynamic"):
        # the paper's lambda schedule scaled to a short fine-tune: held at 1 for 5% of the steps, then lowered over
        # the next 45%; a router learning rate that moves the routers within a few hundred steps
        opts = {"hold_steps": max(1, steps // 20), "warmup_steps": max(1, (steps * 9) // 20), **cfg["dynamic"]}
        args += ["--dynamic", json.dumps(opts), "--stratify-timesteps", "4", "--router-lr", str(settings.router_lr)]
    return args


def _write_final(model: DiT, out: Path, meta: dict[str, Any], card: str, files: dict[str, str]) -> None:
    """The checkpoint files into OUT (atomically, file by file, keeping OUT's stage folders)."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp, meta, card, files)
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(tmp, ignore_errors=True)


def plan_graft(settings: GraftSettings) -> dict[str, Any]:
    """Check a graft request and work out what it will do, writing nothing (bad input fails here, clearly).

    Returns {"source", "meta", "fingerprint", "cfg", "layers", "replacements", "units", "stage1_steps",
    "stage2_steps", "budget", "data", "src_train", "summary"}.
    """
    out = Path(settings.output)
    src_path = Path(settings.source)
    if out.resolve() == src_path.resolve() or src_path.resolve() in out.resolve().parents:
        raise GraftError("the output folder must not be (inside) the source checkpoint; the source is never modified")
    if out.exists() and not settings.resume:
        raise GraftError(f"output folder {out} exists; choose a new one (nothing is overwritten), or pass --resume "
                         "to continue an interrupted graft there")
    if settings.stop_after not in (None, *STAGES):
        raise GraftError(f"--stop-after must be one of {', '.join(STAGES)}")
    if settings.stage1_loss not in LOSSES:
        raise GraftError(f"--stage1-loss must be one of {', '.join(LOSSES)}")
    modes = sum(bool(x) for x in (settings.replace, settings.restructure, settings.dynamic))
    if modes != 1:
        raise GraftError("say what to graft: --replace KIND=OP (repeatable), or --restructure parallel, or "
                         "--dynamic '{\"target\": 0.5}' (exactly one of them)")
    if settings.stage1_file and not Path(settings.stage1_file).is_file():
        raise GraftError(f"--stage1 {settings.stage1_file}: no such file (a graft_stage1.safetensors of dit.graft)")
    if settings.restructure not in (None, "parallel"):
        raise GraftError(f"--restructure {settings.restructure!r}: the only restructuring is 'parallel'")

    source, meta, fingerprint = load_source(settings.source)
    cfg_src = source_config(source)
    src_train = source_training(meta)
    data = settings.data or meta.get("data")
    replacements = [Replacement.parse(r) for r in settings.replace]
    try:
        options = json.loads(settings.options) if settings.options else None
    except json.JSONDecodeError as err:
        raise GraftError(f"--options {settings.options!r} is not JSON ({err}); e.g. '{{\"window_size\": 5}}'") from err
    depth = int(cfg_src["depth"])
    layers: list[int] = []
    if settings.restructure:
        cfg = restructure_config(cfg_src)
        layers = list(range(depth))
    elif settings.dynamic:
        from ..dynamic import dynamic_options

        try:
            cfg = dict(cfg_src, dynamic=json.loads(settings.dynamic))
            dynamic_options(cfg["dynamic"])
        except (ValueError, json.JSONDecodeError) as err:
            raise GraftError(f"--dynamic: {err}") from err
    else:
        layers = parse_layers(settings.layers, depth)
        cfg = graft_config(cfg_src, replacements, layers, options)
        check_operators(cfg, layers, replacements)
    units = units_for(layers, replacements, bool(settings.restructure), depth)
    s1, s2, budget = plan_budget(settings, src_train, has_stage1=bool(units))
    if s1 and not data:
        raise GraftError("the source checkpoint names no training data (studio.json 'data'), which stage 1 needs: "
                         "pass --data digits|FOLDER, or skip stage 1 with --stage1-steps 0")
    summary = (f"grafting {settings.source} -> {out}: "
               + (f"{', '.join(map(str, replacements))} at blocks {layers}" if replacements else
                  "restructure: pairs of blocks -> parallel blocks" if settings.restructure else
                  f"DyDiT routers {cfg['dynamic']}")
               + f"; stage 1 {s1} steps, stage 2 {s2} steps"
               + (f" (budget {budget} = {BUDGET_SHARE:.0%} of the source's {src_train['steps']} steps)"
                  if budget else ""))
    return {"source": source, "meta": meta, "fingerprint": fingerprint, "cfg": cfg, "layers": layers,
            "replacements": replacements, "units": units, "stage1_steps": s1, "stage2_steps": s2, "budget": budget,
            "data": data, "src_train": src_train, "summary": summary}


def run_graft(settings: GraftSettings, log: Callable[[str], None] = _log,
              callback: Callable[[int, int, str], None] | None = None,
              cancel: Any = None) -> dict[str, Any]:
    """Run the whole graft (see the module doc); returns the report dict.

    `callback(done, total, stage)` is told each stage as it starts (UI progress); `cancel` (an Event) stops the
    graft between stages with `GraftError("cancelled")`.
    """
    from .report import build_report, model_card, report_markdown

    started = time.time()
    plan = plan_graft(settings)
    out = Path(settings.output)
    source, meta, fingerprint, cfg = plan["source"], plan["meta"], plan["fingerprint"], plan["cfg"]
    layers, replacements, units = plan["layers"], plan["replacements"], plan["units"]
    s1, s2, budget, data, src_train = (plan["stage1_steps"], plan["stage2_steps"], plan["budget"], plan["data"],
                                       plan["src_train"])
    log(plan["summary"])

    def stage(done: int, desc: str) -> None:
        if cancel is not None and cancel.is_set():
            raise GraftError(f"cancelled before {desc}; the output folder {out} holds what was done so far")
        if callback is not None:
            callback(done, 4, desc)

    stage(0, "stage 1")
    out.mkdir(parents=True, exist_ok=True)
    stage1_dir = out / "stage1"
    grafted, init_info = build_grafted(source, cfg, units, settings.init, settings.seed)
    stage1_info: dict[str, Any] = {"steps": 0}
    stage1_seconds = 0.0
    side = int(cfg["input_size"]) // int(cfg["patch_size"])
    given = settings.stage1_file
    if given is None and settings.resume and (stage1_dir / STAGE1_FILE).exists():
        given = str(stage1_dir / STAGE1_FILE)
    if units and given:
        load_stage1(grafted, units, given, fingerprint)
        stage1_info = {"steps": 0, "loaded_from": str(given)}
        log(f"stage 1: weights loaded from {given} (every key checked)")
        s1 = 0
    if units and s1 > 0:
        t0 = time.time()
        from ..schedulers import get_objective

        images, labels = stage1_dataset(data, meta, int(cfg["input_size"]))
        cache = record_activations(source, units, images, labels, get_objective(meta.get("objective", "ddpm")),
                                   settings.stage1_samples, settings.uncond_fraction, settings.stage1_batch_size,
                                   settings.cache_dir, settings.max_cache_gb, settings.seed, settings.progress, log)
        stage1_info = distill_units(grafted, units, cache, (side, side), s1, settings.stage1_batch_size,
                                    settings.stage1_lr, settings.stage1_loss, settings.huber_delta, seed=settings.seed,
                                    progress=settings.progress, log=log)
        stage1_seconds = time.time() - t0
        del cache
    stage1_info["seconds"] = round(stage1_seconds, 1)
    start_meta = {k: v for k, v in meta.items() if k not in ("training", "source")}
    start_meta["graft"] = {"source": str(settings.source), "stage": "stage1"}
    save_checkpoint(grafted, stage1_dir, start_meta)
    if units:
        path = save_stage1(grafted, units, stage1_dir / STAGE1_FILE, fingerprint, cfg, stage1_info.get("units"))
        # Prove the stage-1 weights load (the reference release's silent no-load bug): a fresh grafted model
        # gets them from the file, every key checked both ways.
        check, _ = build_grafted(source, cfg, units, "random", settings.seed + 1)
        load_stage1(check, units, path, fingerprint)
        grafted = check

    final, stage2_info = grafted, {"steps": 0}
    stage(2, "stage 2")
    if s2 > 0:
        from ..training import parse_args, train

        batch = settings.stage2_batch_size or src_train.get("batch_size") or 32
        argv = stage2_args(settings, stage1_dir, out, meta, cfg, s2, data or "digits", batch)
        if not data:
            raise GraftError("stage 2 needs the source's training data: pass --data digits|FOLDER")
        log("stage 2: python train.py " + " ".join(argv))
        t0 = time.time()
        saved_argv = sys.argv
        sys.argv = ["train.py", *argv]  # train.py records its own command line in studio.json
        try:
            export = train(parse_args(argv))
        finally:
            sys.argv = saved_argv
        final = DiT.from_pretrained(export).eval()
        stage2_info = {"steps": s2, "batch_size": batch, "lr": settings.stage2_lr,
                       "ema_decay": settings.stage2_ema_decay, "distill_from_source": settings.distill,
                       "command": "python train.py " + " ".join(argv), "seconds": round(time.time() - t0, 1)}

    stage(3, "report (latency, quality)")
    report = build_report(settings, source, final, meta, cfg, layers, replacements, units, init_info, stage1_info,
                          stage2_info, src_train, budget, log)
    report["seconds_total"] = round(time.time() - started, 1)
    final_meta = {k: v for k, v in meta.items() if k != "source"}
    final_meta["training"] = {"steps": (src_train.get("steps") or 0) + s1 + s2, "graft": report["compute"],
                              "command": report["command"]}
    final_meta["graft"] = {"source": str(settings.source), "report": "graft_report.json"}
    files = {"graft_report.json": json.dumps(report, indent=2, default=str),
             "graft_report.md": report_markdown(report)}
    if report.get("quality", {}).get("grafted"):
        files["eval.json"] = json.dumps(report["quality"]["grafted"], indent=2, default=str)
    _write_final(final, out, final_meta, model_card(report), files)
    log(f"wrote the grafted checkpoint, model card and report to {out}")
    if callback is not None:
        callback(4, 4, "done")
    return report


def settings_dict(settings: GraftSettings) -> dict[str, Any]:
    return asdict(settings)


__all__ = ["GraftSettings", "run_graft", "GraftError", "count_params"]
