"""`python -m dit.graft SOURCE OUT [--replace attention=linear] [--layers all] ...` (see `dit.graft.run`)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..attention import attention_names
from ..mlp import MLP_REGISTRY
from .distill import LOSSES
from .layers import FORMS, LayerSpecError
from .replace import INIT_MODES, GraftError
from .run import STAGES, GraftSettings, run_graft


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.graft", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Graft new operators into a trained DiT (replace, stage-1 activation distillation, stage-2 "
                    "fine-tune through train.py), restructure it into parallel blocks, or add DyDiT routers; "
                    "writes a studio checkpoint with a report and model card. The source is never modified.")
    a = p.add_argument
    a("source", help="studio checkpoint folder of the trained model")
    a("output", help="new folder for the grafted checkpoint (must not exist)")
    a("--replace", action="append", default=[], metavar="KIND=OP",
      help=f"attention=OP ({', '.join(attention_names())}) and/or mlp=OP ({', '.join(sorted(MLP_REGISTRY))}; "
           "mlp=mlp:6 changes the expansion ratio)")
    a("--layers", default="all", help="blocks to replace: " + FORMS.replace("%", "%%"))
    a("--restructure", choices=("parallel",), default=None,
      help="pairs of sequential blocks -> parallel blocks (depth halved)")
    a("--dynamic", default=None, metavar="JSON",
      help="add DyDiT routers and fine-tune toward a FLOPs target, e.g. '{\"target\": 0.7}'")
    a("--options", default=None, metavar="JSON",
      help="attention options of the new operators, e.g. '{\"window_size\": 5}' or '{\"linear_heads\": 2}'")
    a("--init", choices=INIT_MODES, default="inherit",
      help="new operators: inherit the source weights that fit by name and shape, or start random")
    a("--stage1", dest="stage1_file", default=None, metavar="FILE",
      help="use this stage-1 weights file (graft_stage1.safetensors) instead of running stage 1")
    a("--stage1-steps", type=int, default=None, help="default: 20%% of the budget (10%% of the source's steps)")
    a("--stage2-steps", type=int, default=None, help="default: the rest of the budget")
    a("--stop-after", choices=STAGES, default=None, help="stage1: write the stage-1 model as the result")
    a("--stage1-loss", choices=LOSSES, default="l1")
    a("--huber-delta", type=float, default=1.0)
    a("--stage1-samples", type=int, default=2048, help="cached samples (one random timestep each)")
    a("--stage1-batch-size", type=int, default=64)
    a("--stage1-lr", type=float, default=1e-3)
    a("--uncond-fraction", type=float, default=0.3, help="share of cached samples with the null (CFG) label")
    a("--cache-dir", default=None, help="cache the activations as fp16 files here instead of in memory")
    a("--max-cache-gb", type=float, default=4.0, help="largest in-memory cache")
    a("--stage2-batch-size", type=int, default=None, help="default: the source's training batch")
    a("--stage2-lr", type=float, default=1e-4)
    a("--stage2-ema-decay", type=float, default=0.995)
    a("--distill", action="store_true",
      help="stage 2 adds LiT's hybrid distillation from the source (train.py --teacher)")
    a("--router-lr", type=float, default=1e-2, help="--dynamic: learning rate of the routers in stage 2")
    a("--data", default=None, help="training data (default: the source's, from its studio.json)")
    a("--seed", type=int, default=0)
    a("--no-eval", dest="evaluate", action="store_false", help="skip dit.eval before/after (digits models)")
    a("--eval-per-class", type=int, default=50)
    a("--no-bench", dest="bench", action="store_false", help="skip the latency measurement")
    a("--bench-tokens", type=int, default=4096, help="the large token count of the report's FLOPs and latency")
    a("--resume", action="store_true", help="continue an interrupted graft in OUTPUT (stage 1 file, stage 2 run)")
    a("--no-progress", dest="progress", action="store_false")
    a("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a shared machine)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = GraftSettings(**vars(args))
    try:
        run_graft(settings)
    except (GraftError, LayerSpecError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
