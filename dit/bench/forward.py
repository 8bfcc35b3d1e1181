"""DiT forward and sampling speed: the studio vs diffusers' DiTTransformer2DModel, against the fp32 matmul ceiling.

    python -m dit.bench                 # = python -m dit.bench forward (DiT-S/2, 256 tokens, batch 2 and 8)
    python -m dit.bench forward --quick

Same weights in both (`dit.convert.to_diffusers`), fp32, `torch.inference_mode`, timings interleaved
(studio, diffusers, matmul probes, studio, ...) so that load from other processes hits all alike; the
headline is the best of the interleaved runs (the least-disturbed estimate on a shared machine), the
medians are printed and saved too.

FLOPs convention: `torch.utils.flop_counter.FlopCounterMode` counts 2 FLOPs per multiply-add
(FLOPs = 2 x MACs); the attention products, which it does not see in CPU SDPA kernels, are added at
2 x their MACs (QK^T and AV, 4 B h T^2 d). This is the "real FLOPs" count, not the paper's "Gflops"
(which are MACs with attention doubled; DiT-S/2: 5.45 GMAC = 10.9 GFLOP, paper 6.06). Both models get
the studio's count (the useful work); diffusers' extra per-block timestep MLPs are not credited.

The ceiling is plain fp32 `torch.mm` on this machine: square products sized like the model's linears
(D, 2D, 4D; the best is "the ceiling"), measured between the forwards; for information also the
FLOP-weighted rate of products shaped exactly like the model's linears at batch B (M = B*T).
Sampling: `dit.schedulers.sample` with the same scheduler, steps, CFG and seeds for both models (the
diffusers model wrapped to the studio's `model(x, t, y)` call); images/s over the whole run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._common import RESULTS_DIR, machine_info, matmul_gflops, median, timed, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="DiT-S/2", help="preset (default DiT-S/2: 256 tokens at 32x32 latents)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per model and batch size")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--images", type=int, default=2, help="images per sampling run (CFG doubles the batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (use with --threads 1 on a busy, shared machine)")
    parser.add_argument("--quick", action="store_true", help="batch 2 only, 3 repeats, 3 sampling steps")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")


def sdpa_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """QK^T and AV of (B, h, T, d) tensors at 2 FLOPs per multiply-add."""
    b, h, s, d = q
    return 2 * b * h * s * k[-2] * (d + v[-1])


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 x MACs) of one call, CPU SDPA kernels included."""
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = sdpa_flops
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def build_models(preset: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A studio DiT with random weights everywhere (no zero-init shortcuts) and the same weights in diffusers."""
    from dit import DiT, model_kwargs
    from dit.convert import to_diffusers

    torch.manual_seed(0)
    model = DiT(**model_kwargs(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.02)
    return model, to_diffusers(model)


def square_sizes(hidden: int) -> list[int]:
    """Square matmul sizes like the model's linears: D (proj), 2D, 4D (the MLP width)."""
    return [hidden, 2 * hidden, 4 * hidden]


def linear_shaped_gflops(hidden: int, tokens: int, batch: int, repeats: int, clock: str = "wall") -> float:
    """fp32 matmul GFLOP/s over the model's own linear shapes (M = B*T): qkv, proj, fc1, fc2, FLOP-weighted."""
    m = batch * tokens
    shapes = [(m, hidden, 3 * hidden), (m, hidden, hidden), (m, hidden, 4 * hidden), (m, 4 * hidden, hidden)]
    total_flops = sum(2 * a * k * n for a, k, n in shapes)
    total_time = sum(2 * a * k * n / (matmul_gflops(a, k, n, repeats=repeats, clock=clock) * 1e9) for a, k, n in shapes)
    return total_flops / total_time / 1e9


def run(args: argparse.Namespace) -> int:
    from dit.schedulers import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch_sizes, args.repeats, args.steps, args.warmup = [2], 3, 3, 1
    model, dmodel = build_models(args.model)
    cfg = model.config
    size, chans, grid = cfg.input_size, cfg.in_channels, cfg.input_size // cfg.patch_size
    tokens = grid * grid
    diff_call = lambda x, t, y: dmodel(x, t, y, return_dict=False)[0]  # noqa: E731

    print(f"# dit.bench forward: {args.model} ({tokens} tokens), fp32, inference_mode, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    rows = []
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(b)
        x = torch.randn(b, chans, size, size, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        y = torch.randint(0, cfg.num_classes, (b,), generator=g)
        flops = count_flops(lambda: model(x, t, y))
        flops_diffusers = count_flops(lambda: diff_call(x, t, y))
        sizes = square_sizes(cfg.hidden_size)
        with torch.inference_mode():
            timed(lambda: model(x, t, y), args.warmup, 0)
            timed(lambda: diff_call(x, t, y), args.warmup, 0)
            clk = args.clock
            ts: list[float] = []
            td: list[float] = []
            tm: dict[int, list[float]] = {n: [] for n in sizes}
            for _ in range(args.repeats):  # interleaved, so that other processes' load hits all alike
                ts += timed(lambda: model(x, t, y), 0, 1, clk)
                td += timed(lambda: diff_call(x, t, y), 0, 1, clk)
                for n in sizes:
                    tm[n].append(matmul_gflops(n, n, n, warmup=1, repeats=1, clock=clk))
        square = {n: max(v) for n, v in tm.items()}
        ceil = max(square.values())
        s, d = min(ts), min(td)  # best of interleaved runs: the least-disturbed estimate on a shared machine
        rows.append({"batch": b, "flops": flops, "flops_diffusers_counted": flops_diffusers,
                     "studio_ms": 1e3 * s, "diffusers_ms": 1e3 * d, "studio_ms_median": 1e3 * median(ts),
                     "diffusers_ms_median": 1e3 * median(td), "studio_gflops": flops / s / 1e9,
                     "diffusers_gflops": flops / d / 1e9, "speedup": d / s,
                     "speedup_median": median(td) / median(ts),
                     "square_matmul_gflops": square, "ceiling_gflops": ceil,
                     "linear_shaped_gflops": linear_shaped_gflops(cfg.hidden_size, tokens, b, 2 if args.quick else 3,
                                                                  args.clock),
                     "studio_pct_of_ceiling": 100 * flops / s / 1e9 / ceil,
                     "diffusers_pct_of_ceiling": 100 * flops / d / 1e9 / ceil})

    # full sampling runs: same loop, scheduler, steps, CFG and seeds; only the model differs
    n = args.images
    labels = torch.arange(n) % cfg.num_classes
    common = dict(labels=labels, seeds=list(range(n)), shape=(chans, size, size), scheduler_name=args.scheduler,
                  steps=args.steps, cfg_scale=args.cfg_scale, learn_sigma=cfg.learn_sigma,
                  null_class=cfg.num_classes, progress=False)
    runs: dict[str, list[float]] = {"studio": [], "diffusers": []}
    with torch.inference_mode():
        for _ in range(1 if args.quick else 2):  # interleaved, best of
            for name, fn in (("studio", model), ("diffusers", diff_call)):
                runs[name] += timed(lambda: sample(fn, **common), 0, 1, args.clock)
    sampling: dict[str, Any] = {name: {"seconds": min(v), "images_per_s": n / min(v)} for name, v in runs.items()}
    sampling["speedup"] = sampling["diffusers"]["seconds"] / sampling["studio"]["seconds"]

    print()
    print("| batch | GFLOP/forward | studio ms | diffusers ms | studio GFLOP/s | diffusers GFLOP/s | "
          "studio/diffusers speed | fp32 matmul ceiling GFLOP/s | studio % of ceiling | diffusers % of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['flops'] / 1e9:.2f} | {r['studio_ms']:.1f} | {r['diffusers_ms']:.1f} | "
              f"{r['studio_gflops']:.1f} | {r['diffusers_gflops']:.1f} | {r['speedup']:.2f}x | "
              f"{r['ceiling_gflops']:.1f} | {r['studio_pct_of_ceiling']:.0f}% | {r['diffusers_pct_of_ceiling']:.0f}% |")
    print()
    for r in rows:
        sq = ", ".join(f"{k}^3 {v:.1f}" for k, v in r["square_matmul_gflops"].items())
        print(f"batch {r['batch']}: square matmuls {sq}; the model's linear shapes {r['linear_shaped_gflops']:.1f} "
              f"GFLOP/s; medians: studio {r['studio_ms_median']:.1f} ms, diffusers {r['diffusers_ms_median']:.1f} ms "
              f"({r['speedup_median']:.2f}x)")
    print(f"sampling {n} images, {args.scheduler} {args.steps} steps, CFG {args.cfg_scale} (batch {2 * n}): "
          f"studio {sampling['studio']['images_per_s']:.3f} img/s ({sampling['studio']['seconds']:.1f} s), "
          f"diffusers {sampling['diffusers']['images_per_s']:.3f} img/s ({sampling['diffusers']['seconds']:.1f} s), "
          f"speed {sampling['speedup']:.2f}x")
    print(f"FLOPs = 2 x multiply-adds (FlopCounterMode + SDPA products); times: best of interleaved runs, "
          f"{args.clock} clock; load average {machine_info()['load_average']}")

    payload = {"benchmark": "forward", "model": args.model, "tokens": tokens, "dtype": "float32",
               "flops_convention": "2 x multiply-adds (torch FlopCounterMode, CPU SDPA products added)",
               "machine": machine_info(), "forward": rows, "sampling": sampling,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    path = write_json("forward", payload, args.out)
    print(f"wrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(payload, args.out / 'forward.png')}")
    return 0


def plot(payload: dict[str, Any], path: Path) -> Path:
    """Bars: GFLOP/s per batch (studio, diffusers) with the matmul ceiling; images/s of the sampling run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, smp = payload["forward"], payload["sampling"]
    ceil = max(r["ceiling_gflops"] for r in rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    xs = range(len(rows))
    ax1.bar([i - 0.2 for i in xs], [r["studio_gflops"] for r in rows], 0.4, label="studio")
    ax1.bar([i + 0.2 for i in xs], [r["diffusers_gflops"] for r in rows], 0.4, label="diffusers")
    ax1.axhline(ceil, color="k", ls="--", lw=1, label=f"fp32 matmul ceiling {ceil:.0f}")
    ax1.axhline(0.85 * ceil, color="gray", ls=":", lw=1, label="85% of ceiling")
    ax1.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
    ax1.set_ylabel("GFLOP/s (2 x MACs)")
    ax1.set_title(f"{payload['model']} forward, {payload['tokens']} tokens, fp32")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.bar(["studio", "diffusers"], [smp["studio"]["images_per_s"], smp["diffusers"]["images_per_s"]],
            color=["C0", "C1"])
    st = payload["settings"]
    ax2.set_title(f"sampling: {st['scheduler']} {st['steps']} steps, CFG")
    ax2.set_ylabel("images/s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
