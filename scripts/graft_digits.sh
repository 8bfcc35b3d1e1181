#!/usr/bin/env bash
# The grafting demos of the README (checkpoints/grafted/*): each graft spends at most 10% of the bundled
# model's 5000 training steps (100 stage-1 + 400 stage-2 steps). One thread each: the figures in the README
# were measured on a shared 2-core CPU with two of these running side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
G="python -m dit.graft checkpoints/dit-digits"
$G checkpoints/grafted/linear-50 --replace attention=linear --layers 50% --stage2-lr 2e-4 --threads 1
$G checkpoints/grafted/proxy-100 --replace attention=proxy --layers all --stage2-lr 2e-4 --threads 1
$G checkpoints/grafted/linear-100 --replace attention=linear --layers all --stage2-lr 2e-4 --stage2-batch-size 16 --threads 1
$G checkpoints/grafted/window-100 --replace attention=window --layers all --stage2-lr 2e-4 --stage2-batch-size 16 --threads 1
$G checkpoints/grafted/parallel-half --restructure parallel --stage2-lr 2e-4 --stage2-batch-size 16 --threads 1
python scripts/graft_table.py   # the README's table from the reports
