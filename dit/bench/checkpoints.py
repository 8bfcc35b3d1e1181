"""Forward latency and FLOPs of whole checkpoints side by side (e.g. a model and its grafted variants).

    python -m dit.bench checkpoints checkpoints/dit-digits checkpoints/grafted/linear-100 --tokens 64 4096

For each token count T (a square grid; the input is sqrt(T) * patch pixels per side, the position table is
recomputed for sizes other than the trained one) every model runs `--repeats` timed no-grad forwards of a
batch after one warm-up, interleaved model by model so that all see the same machine load; the best
(minimum) time is reported with the median in the JSON. FLOPs: `dit.flops.model_flops` (multiply-adds,
DiT paper convention, per sample). `--threads 1` gives the steadiest ratios on a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ._common import machine_info


@torch.inference_mode()
def forward_latency(models: Mapping[str, torch.nn.Module], tokens: int, batch: int = 1, repeats: int = 5,
                    warmup: int = 1, seed: int = 0) -> dict[str, dict[str, float]]:
    """{name: {"best_s", "median_s"}} of one forward of `batch` samples at `tokens` tokens, interleaved."""
    side = math.isqrt(int(tokens))
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens is not a square grid")
    inputs = {}
    gen = torch.Generator().manual_seed(seed)
    for name, model in models.items():
        model.eval()
        p, c = model.patch_size, model.in_channels
        inputs[name] = (torch.randn(batch, c, side * p, side * p, generator=gen),
                        torch.randint(0, 1000, (batch,), generator=gen).float() % 1000,
                        torch.randint(0, int(model.config.num_classes), (batch,), generator=gen))
    for name, model in models.items():
        for _ in range(warmup):
            model(*inputs[name])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(*inputs[name])
            times[name].append(time.perf_counter() - start)
    return {name: {"best_s": min(ts), "median_s": statistics.median(ts)} for name, ts in times.items()}


def compare(models: Mapping[str, torch.nn.Module], token_counts: Sequence[int], batch: int = 1,
            repeats: int = 5) -> list[dict[str, Any]]:
    """One row per (model, T): FLOPs (G, per sample), best / median latency, ratios to the first model."""
    from dit.flops import model_flops

    rows = []
    for tokens in token_counts:
        lat = forward_latency(models, tokens, batch, repeats)
        base = next(iter(models))
        for name, model in models.items():
            flops = model_flops(model, tokens=tokens)["total"]
            rows.append({"model": name, "tokens": int(tokens), "batch": batch, "gflops": flops / 1e9,
                         "best_ms": 1e3 * lat[name]["best_s"], "median_ms": 1e3 * lat[name]["median_s"],
                         "latency_ratio": lat[name]["best_s"] / lat[base]["best_s"],
                         "flops_ratio": flops / model_flops(models[base], tokens=tokens)["total"]})
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'model':<40} {'tokens':>6} {'GFLOPs':>8} {'best ms':>9} {'vs first':>8} {'FLOPs vs first':>14}"]
    for r in rows:
        lines.append(f"{r['model'][-40:]:<40} {r['tokens']:>6} {r['gflops']:>8.3f} {r['best_ms']:>9.2f} "
                     f"{r['latency_ratio']:>7.2f}x {r['flops_ratio']:>13.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from dit.convert import load_any

    p = argparse.ArgumentParser(prog="python -m dit.bench checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (the first is the reference)")
    p.add_argument("--tokens", type=int, nargs="+", default=[None], help="token counts (default: each model's own)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {path: load_any(path, device="cpu")[0] for path in args.checkpoints}
    first = next(iter(models.values()))
    own = (first.config.input_size // first.patch_size) ** 2
    tokens = [t if t is not None else own for t in args.tokens]
    rows = compare(models, tokens, args.batch, args.repeats)
    print(format_rows(rows))
    if args.output:
        Path(args.output).write_text(json.dumps({"rows": rows, "machine": machine_info()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
