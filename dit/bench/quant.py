"""Quantized checkpoints against float32: file size, resident memory and sampling time, on this CPU.

    python -m dit.bench quant --checkpoints checkpoints/dit-digits out/digits-w4a8 out/digits-w8a8 ...

Each checkpoint is measured in its own fresh Python process (so resident memory is not polluted by the
others): RSS right before loading, after loading (the model's resident cost) and the peak during
sampling (`VmHWM`), the bytes of its tensors and of its weights file, and the time of a full sampling
run (`dit.schedulers.sample` with the checkpoint's default scheduler, steps and CFG; best of
`--repeats`; wall or CPU clock). The first checkpoint is the baseline of the ratios.

On CPU a quantized layer dequantizes its weight per call, so quantized sampling is not faster here: the
gain is memory and file size. FP8 GEMMs (`torch._scaled_mm`) only pay off on SM 8.9+ GPUs; this
benchmark does not measure them (no GPU on the machine these numbers were taken on).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import RESULTS_DIR, machine_info, write_json

CHILD = ("import json, sys; from dit.bench.quant import measure_one; "
         "print('RESULT ' + json.dumps(measure_one(*json.loads(sys.argv[1]))))")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", nargs="+", default=["checkpoints/dit-digits"],
                        help="float baseline first, then quantized folders (python -m dit.quant outputs)")
    parser.add_argument("--images", type=int, default=10, help="images per sampling run (CFG doubles the batch)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="CPU time of the process (default; robust on a shared machine with --threads 1) or wall")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")


def _rss() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure_one(path: str, images: int, steps: int | None, repeats: int, threads: int, clock: str) -> dict[str, Any]:
    """Runs in a child process: load `path`, sample, report memory and time."""
    import torch

    from ..convert import load_any
    from ..quant.storage import QUANT_WEIGHTS, is_quantized_folder
    from ..schedulers import sample
    from ._common import CLOCKS

    torch.set_num_threads(threads)
    import gc

    from .. import schedulers  # noqa: F401  (everything imported before the baseline RSS, torchao included)
    from ..quant import calibrate, formats, layers, storage  # noqa: F401

    formats.torchao_fp_utils()
    gc.collect()
    before = _rss()["VmRSS"]
    model, meta = load_any(path)
    after = _rss()["VmRSS"]
    folder = Path(path)
    weights = folder / (QUANT_WEIGHTS if is_quantized_folder(folder) else "diffusion_pytorch_model.safetensors")
    cfg = model.config
    labels = torch.arange(images) % cfg.num_classes
    steps = steps or int(meta["default_steps"])
    now = CLOCKS[clock]
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = now()
        sample(model, labels, list(range(images)), (cfg.in_channels, cfg.input_size, cfg.input_size),
               scheduler_name=meta["default_scheduler"], steps=steps, cfg_scale=float(meta["default_cfg_scale"]),
               objective=meta["objective"], learn_sigma=bool(cfg.learn_sigma), null_class=cfg.num_classes,
               progress=False)
        times.append(now() - start)
    tensors = list(model.parameters()) + list(model.buffers())
    return {"checkpoint": path, "file_bytes": weights.stat().st_size,
            "tensor_bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
            "rss_model_bytes": after - before, "rss_peak_sampling_bytes": _rss()["VmHWM"] - before,
            "seconds": min(times[1:]), "steps": steps, "images": images,
            "quantized": meta.get("quantization")}


def run(args: argparse.Namespace) -> int:
    rows = []
    for path in args.checkpoints:
        payload = json.dumps([path, args.images, args.steps, args.repeats, args.threads, args.clock])
        proc = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"error: measuring {path} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 2
        rows.append(json.loads(line[-1][len("RESULT "):]))
    base = rows[0]
    for r in rows:
        for key in ("file_bytes", "rss_model_bytes", "seconds"):
            r[key.replace("_bytes", "") + "_ratio"] = r[key] / base[key] if base[key] else float("nan")
    header = (f"{'checkpoint':<44} {'file MB':>8} {'x':>6} {'tensors MB':>10} {'RSS model MB':>12} {'x':>6} "
              f"{'RSS peak MB':>11} {f'sample s ({args.clock})':>16} {'x':>6}")
    print(f"quantization benchmark: {args.images} images, CFG on, {args.threads} thread(s), clock {args.clock}, "
          "CPU only (GPU FP8 matmul not measured)")
    print(header)
    for r in rows:
        print(f"{Path(r['checkpoint']).name:<44} {r['file_bytes'] / 1e6:>8.2f} {r['file_ratio']:>6.3f} "
              f"{r['tensor_bytes'] / 1e6:>10.2f} {r['rss_model_bytes'] / 1e6:>12.1f} {r['rss_model_ratio']:>6.2f} "
              f"{r['rss_peak_sampling_bytes'] / 1e6:>11.1f} {r['seconds']:>16.2f} {r['seconds_ratio']:>6.2f}")
    payload = {"machine": machine_info(), "settings": vars(args) | {"out": str(args.out)}, "rows": rows,
               "gpu": "not measured (no GPU on this machine)"}
    path = write_json("quant", payload, args.out)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(rows, args.out / 'quant.png')}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["checkpoint"]).name for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("file_bytes", "rss_model_bytes", "seconds"),
                              ("weights file (MB)", "resident memory of the model (MB)", "sampling time (s)")):
        values = [r[key] / (1e6 if key.endswith("bytes") else 1) for r in rows]
        ax.barh(names, values, color=["#888"] + ["#3a7"] * (len(rows) - 1))
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
