"""Attention benchmark: softmax (SDPA) vs LiT linear vs PT-DiT proxy attention, latency, peak memory
and FLOPs against the token count.

    python -m dit.bench attention            # 256, 1024, 4096, 16384 tokens
    python -m dit.bench attention --quick    # 256 and 1024 tokens only (smoke run)
    python -m dit.bench.attention ...        # the same without the bench registry

Scopes, all at DiT-S width (hidden 384, 6 heads, batch 1, inference under no_grad, float32):
- `attention`: the operator alone, including its pre/post hooks (proxy's GIIM and SWSA);
- `block`: one adaLN-Zero DiT block (attention + MLP + adaLN);
- `model`: a 2-block DiT-S-width model (patch 2, 4 latent channels, learned sigma; the paper's 12
  blocks scale the block numbers, 2 keep the 16384-token softmax runs feasible on a CPU).
Token counts T are square grids; proxy windows follow PT-DiT's rule (grid / 8 per side).

Method:
- every (scope, variant, T) runs in a fresh Python process (`--worker`), so its peak memory is
  measurable: peak = `ru_maxrss` after the first forward minus the resident set before it (the
  operator's activations and workspace, allocator overhead included; weights and inputs excluded).
  tracemalloc cannot see torch's allocations, hence this method. On CUDA it is
  `torch.cuda.max_memory_allocated` minus the allocation before the forward.
- latency: the best (minimum) of `--repeats` (default: as many as fit in ~3 s, 2..15) timed forwards
  after that first (warm-up) forward (the median is in the JSON too); the minimum is the estimate
  least disturbed by other processes on a shared machine. Variants of one (scope, T) run back to
  back so that they see the same load.
- FLOPs: `dit.flops` (multiply-adds, DiT paper convention); ratios are softmax / variant, measured in
  the same run. Efficiency = measured speed-up / FLOP-ratio speed-up (the issue's target: >= 0.8
  where the FLOP ratio > 1.5).
- threads: `--threads 1` gives the steadiest ratios on a shared, loaded CPU (with 2 threads every
  parallel op waits for a descheduled thread); the numbers in the issue's report used it.
- configurations whose estimated memory exceeds `--max-gb` (default 8) are skipped and listed.
Writes a table to stdout, `attention.json` and `attention.png` to `--output` (bench/results).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

VARIANTS = ("softmax", "linear", "proxy")
TOKENS = (256, 1024, 4096, 16384)
QUICK_TOKENS = (256, 1024)
SCOPES = ("attention", "block", "model")
WIDTH, HEADS, MODEL_DEPTH, PATCH, CHANNELS = 384, 6, 2, 2, 4
GOALS = {("linear", 4096): 2.0, ("linear", 16384): 6.0, ("proxy", 4096): 1.3, ("proxy", 16384): 3.5}


# ------------------------------------------------------------------------------------ FLOPs / memory
def scope_flops(scope: str, variant: str, tokens: int) -> float:
    """Multiply-adds of one forward of one sample in this scope (DiT paper convention)."""
    from dit.flops import attention_flops, model_flops

    attn = float(attention_flops(variant, WIDTH, HEADS, tokens))
    if scope == "attention":
        return attn
    if scope == "block":
        return attn + 2 * tokens * WIDTH * 4 * WIDTH + 6 * WIDTH * WIDTH
    side = math.isqrt(tokens)
    cfg = dict(input_size=side * PATCH, patch_size=PATCH, in_channels=CHANNELS, hidden_size=WIDTH,
               depth=MODEL_DEPTH, num_heads=HEADS, num_classes=1000, learn_sigma=True, attention=variant)
    return float(model_flops(cfg)["total"])


def estimate_bytes(scope: str, variant: str, tokens: int, backend: str = "sdpa") -> float:
    """Rough upper estimate of a run's memory (for skipping): inputs, weights, ~24 live (T, D) float32
    activations, and the T x T score matrix of every head when the softmax backend materialises it."""
    est = 4.0 * (24 * tokens * WIDTH + 40 * WIDTH * WIDTH * (MODEL_DEPTH if scope == "model" else 1))
    if variant == "softmax" and backend == "math":
        est += 4.0 * 2 * HEADS * tokens * tokens
    return est


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


# ------------------------------------------------------------------------------------ one measurement
def run_worker(scope: str, variant: str, tokens: int, device: str, repeats: int | None, budget_s: float,
               threads: int | None) -> dict[str, Any]:
    """Build one (scope, variant, T) case, measure peak memory of the first forward, then latency."""
    import gc

    import torch

    from dit.attention import BlockContext, build_attention
    from dit.model import DiT, DiTBlock

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    side = math.isqrt(tokens)
    grid = (side, side)
    dev = torch.device(device)
    if scope == "attention":
        op = build_attention(variant, WIDTH, HEADS, backend="sdpa").to(dev).eval()
        x, c, ctx = torch.randn(1, tokens, WIDTH, device=dev), torch.randn(1, WIDTH, device=dev), BlockContext(grid)

        def forward() -> Any:
            h = op.pre_attention(x, c, ctx)
            h = h + op(h, grid)
            return op.post_attention(h, c, ctx)
    elif scope == "block":
        block = DiTBlock(WIDTH, HEADS, attention=variant, attention_options={"backend": "sdpa"}).to(dev).eval()
        x, c, ctx = torch.randn(1, tokens, WIDTH, device=dev), torch.randn(1, WIDTH, device=dev), BlockContext(grid)

        def forward() -> Any:
            return block(x, c, ctx)
    else:
        model = DiT(input_size=side * PATCH, patch_size=PATCH, in_channels=CHANNELS, hidden_size=WIDTH,
                    depth=MODEL_DEPTH, num_heads=HEADS, num_classes=1000, learn_sigma=True,
                    attention=variant).to(dev).eval()
        x = torch.randn(1, CHANNELS, side * PATCH, side * PATCH, device=dev)
        t, y = torch.tensor([500], device=dev), torch.tensor([1], device=dev)

        def forward() -> Any:
            return model(x, t, y)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    gc.collect()
    with torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before, max_before = _rss_bytes(), _maxrss_bytes()
        t0 = time.perf_counter()
        out = forward()
        sync()
        first = time.perf_counter() - t0
        if dev.type == "cuda":
            peak, bound = torch.cuda.max_memory_allocated() - before, False
        else:
            max_after = _maxrss_bytes()
            peak, bound = max(0, max_after - before), max_after <= max_before
        del out
        n = repeats or max(2, min(15, int(budget_s / max(first, 1e-4))))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            forward()
            sync()
            times.append(time.perf_counter() - t0)
    return {"scope": scope, "variant": variant, "tokens": tokens, "grid": list(grid), "device": device,
            "latency_ms": 1000 * min(times), "latency_median_ms": 1000 * statistics.median(times),
            "first_ms": 1000 * first, "repeats": n, "peak_mb": peak / 2 ** 20, "peak_is_upper_bound": bound,
            "threads": torch.get_num_threads()}


def spawn_worker(scope: str, variant: str, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dit.bench.attention", "--worker", scope, variant, str(tokens),
           "--device", args.device, "--budget-s", str(args.budget_s)]
    if args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {scope}/{variant}/{tokens} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report
def add_ratios(rows: list[dict[str, Any]]) -> None:
    ref = {(r["scope"], r["tokens"]): r for r in rows if r["variant"] == "softmax"}
    for r in rows:
        base = ref.get((r["scope"], r["tokens"]))
        if base is None:
            continue
        r["speedup"] = base["latency_ms"] / r["latency_ms"]
        r["flop_ratio"] = base["flops"] / r["flops"]
        r["efficiency"] = r["speedup"] / r["flop_ratio"]
        r["memory_ratio"] = base["peak_mb"] / r["peak_mb"] if r["peak_mb"] > 0 else float("nan")


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'scope':<10}{'tokens':>7} {'variant':<8}{'latency ms':>12}{'speed-up':>10}{'GFLOPs':>10}"
            f"{'FLOP ratio':>11}{'eff.':>7}{'peak MB':>10}{'mem ratio':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_mb']:.1f}" + ("*" if r.get("peak_is_upper_bound") else "")
        lines.append(f"{r['scope']:<10}{r['tokens']:>7} {r['variant']:<8}{r['latency_ms']:>12.1f}"
                     f"{r.get('speedup', float('nan')):>9.2f}x{r['flops'] / 1e9:>10.3f}"
                     f"{r.get('flop_ratio', float('nan')):>10.2f}x{r.get('efficiency', float('nan')):>7.2f}"
                     f"{peak:>10}{r.get('memory_ratio', float('nan')):>9.2f}x")
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["variant"] != "softmax" and r.get("flop_ratio", 0) > 1.5:
            ok = r["efficiency"] >= 0.8
            lines.append(f"[{'ok' if ok else 'MISS'}] {r['scope']}/{r['variant']}@{r['tokens']}: speed-up "
                         f"{r['speedup']:.2f}x is {100 * r['efficiency']:.0f}% of the FLOP-ratio {r['flop_ratio']:.2f}x "
                         "(target >= 80%)")
    for (variant, tokens), goal in GOALS.items():
        for r in rows:
            if r["variant"] == variant and r["tokens"] == tokens and "speedup" in r:
                lines.append(f"[{'ok' if r['speedup'] >= goal else 'MISS'}] goal {r['scope']}/{variant}@{tokens}: "
                             f"{r['speedup']:.2f}x vs softmax (goal >= {goal}x)")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in SCOPES if any(r["scope"] == s for r in rows)]
    fig, axes = plt.subplots(len(scopes), 3, figsize=(15, 4 * len(scopes)), squeeze=False)
    for i, scope in enumerate(scopes):
        for variant in VARIANTS:
            rs = sorted((r for r in rows if r["scope"] == scope and r["variant"] == variant), key=lambda r: r["tokens"])
            if not rs:
                continue
            tok = [r["tokens"] for r in rs]
            line, = axes[i][0].plot(tok, [r["latency_ms"] for r in rs], "o-", label=variant)
            axes[i][1].plot(tok, [r["peak_mb"] for r in rs], "o-", label=variant, color=line.get_color())
            if variant != "softmax":
                axes[i][2].plot(tok, [r["speedup"] for r in rs], "o-", label=f"{variant} measured", color=line.get_color())
                axes[i][2].plot(tok, [r["flop_ratio"] for r in rs], "--", label=f"{variant} FLOP ratio",
                                color=line.get_color())
        for j, (title, ylabel) in enumerate([("latency", "ms"), ("peak memory", "MB"), ("speed-up vs softmax", "x")]):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{scope}: {title}")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"DiT-S width ({WIDTH}, {HEADS} heads), batch 1, float32; model = {MODEL_DEPTH} blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit.bench attention", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 and 1024 tokens only (smoke run)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (squares), default {TOKENS}")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, help="timed forwards per case (default: fit ~--budget-s)")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds of timed forwards per case")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip cases estimated above this memory")
    parser.add_argument("--output", default="bench/results", help="folder for attention.json / attention.png")
    parser.add_argument("--worker", nargs=3, metavar=("SCOPE", "VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        scope, variant, tokens = args.worker
        print(json.dumps(run_worker(scope, variant, int(tokens), args.device, args.repeats, args.budget_s,
                                    args.threads)))
        return 0
    tokens_list = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    for t in tokens_list:
        if math.isqrt(t) ** 2 != t:
            raise SystemExit(f"--tokens {t} is not a square grid; use e.g. 256, 1024, 4096, 16384")
    variants = ["softmax"] + [v for v in args.variants if v != "softmax"]  # ratios need softmax
    rows, skipped = [], []
    start = time.perf_counter()
    for tokens in tokens_list:
        for scope in args.scopes:
            for variant in variants:
                est = estimate_bytes(scope, variant, tokens)
                if est > args.max_gb * 2 ** 30:
                    skipped.append(f"{scope}/{variant}@{tokens}: estimated {est / 2 ** 30:.1f} GB > --max-gb {args.max_gb}")
                    print(f"skip {skipped[-1]}", flush=True)
                    continue
                row = spawn_worker(scope, variant, tokens, args)
                row["flops"] = scope_flops(scope, variant, tokens)
                rows.append(row)
                print(f"  {scope:<9} {variant:<8} T={tokens:<6} {row['latency_ms']:9.1f} ms  "
                      f"peak {row['peak_mb']:8.1f} MB  ({row['repeats']} runs)", flush=True)
    add_ratios(rows)
    table = format_table(rows)
    checks = check_targets(rows)
    print()
    print(table)
    print("(* peak memory is an upper bound: the forward stayed under an earlier high-water mark)")
    print()
    print("\n".join(checks))
    for s in skipped:
        print(f"skipped {s}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"width": WIDTH, "heads": HEADS, "model_depth": MODEL_DEPTH, "patch": PATCH, "batch": 1,
            "dtype": "float32", "device": args.device, "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg(),
            "memory_method": "ru_maxrss after the first forward minus RSS before it, fresh process per case"
            if args.device == "cpu" else "torch.cuda.max_memory_allocated minus allocated before the forward",
            "flops": "multiply-adds, DiT paper convention (dit.flops)", "wall_s": time.perf_counter() - start}
    (out / "attention.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks,
                                                     "skipped": skipped}, indent=2))
    plot(rows, out / "attention.png")
    print(f"\nwrote {out / 'attention.json'} and {out / 'attention.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
