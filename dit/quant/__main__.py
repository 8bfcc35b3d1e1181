"""`python -m dit.quant CKPT OUT --preset w4a8 [--int] [--calib-samples N] [--adaln fp8|fp4|none]`.

Quantizes a DiT checkpoint (studio folder, diffusers folder or official .pt) with FP4DiT's recipe and
writes a packed quantized folder that `sample.py --checkpoint OUT`, `python -m dit.eval OUT` and the UI
load like any other. Prints the report and saves it as OUT/quant_report.{json,md}.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .formats import FormatError
from .presets import ADALN_CHOICES, PRESETS, QuantConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dit.quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("checkpoint", help="float checkpoint: studio folder, diffusers folder or official .pt")
    a("out", help="new output folder (must not exist)")
    a("--preset", default="w4a8", choices=list(PRESETS), help="weights / activations bits")
    a("--int", dest="int_grid", action="store_true", help="integer grids of the same widths instead of FP")
    a("--adaln", default="fp8", help=f"adaLN modulation weights: {', '.join(ADALN_CHOICES)} or a format name")
    a("--weight-format", default=None, help="override the weight format, e.g. e2m1, e1m2, int4")
    a("--mlp-in-format", default=None, help="override the format of the layer before GELU (FP4DiT: e3m0)")
    a("--act-format", default=None, help="override the activation format (e2m3, e3m4, e4m3, int8, none)")
    a("--granularity", default=None, choices=["tensor", "channel", "group", "mx"],
      help="weight scales (default: the preset's; mx = OCP MX blocks of 32 with E8M0 scales)")
    a("--group-size", type=int, default=None, help="group size for group scales (default 128 where it divides the "
                                                   "layer, else per channel; 0 = per channel)")
    a("--keep-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
      help="storage dtype of the layers kept in high precision")
    a("--calib-samples", type=int, default=32, help="images whose sampling trajectories calibrate the model")
    a("--calib-steps", type=int, default=None, help="timesteps kept per trajectory (default: every sampler step)")
    a("--iters", type=int, default=400, help="AdaRound iterations per block (0 = round to nearest)")
    a("--batch-size", type=int, default=16, help="AdaRound batch size")
    a("--lr", type=float, default=1e-3, help="AdaRound learning rate")
    a("--no-adaround", action="store_true", help="round to nearest after the clipping search")
    a("--no-scale-aware", action="store_true", help="plain FP AdaRound (not FP4DiT's scale-aware version)")
    a("--eval-per-class", type=int, default=50, help="digits models: images per class for dit.eval")
    a("--no-eval", action="store_true", help="skip the quality evaluation")
    a("--baseline-eval", default=None, help="float32 metrics to compare with: a `python -m dit.eval --out` JSON made "
                                             "with the same settings (default: CKPT/eval.json if it matches, else "
                                             "evaluated now and written here when given)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> QuantConfig:
    return QuantConfig(
        preset=args.preset, int_grid=args.int_grid, weight_format=args.weight_format,
        mlp_in_format=args.mlp_in_format, act_format=args.act_format, adaln=args.adaln,
        granularity=args.granularity, group_size=args.group_size, keep_dtype=args.keep_dtype,
        calib_samples=args.calib_samples, calib_steps=args.calib_steps, adaround=not args.no_adaround,
        scale_aware=not args.no_scale_aware, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed,
        extra={"command": "python -m dit.quant " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .api import quantize_checkpoint
    from .report import format_report

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = quantize_checkpoint(args.checkpoint, args.out, config_from_args(args, argv),
                                     evaluate=not args.no_eval, eval_per_class=args.eval_per_class,
                                     progress=not args.no_progress, baseline_eval=args.baseline_eval)
    except (ValueError, FileNotFoundError, FormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {args.out} (report: {args.out}/quant_report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
