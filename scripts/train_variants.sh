#!/usr/bin/env bash
# The efficient variants of the bundled digits model, each made from it by weight inheritance and a
# short distilled fine-tune (the LiT / DyDiT recipe at the bundled model's scale), then evaluated
# with the independent classifier (issue threshold: 90% agreement).
#   bash scripts/train_variants.sh [STEPS]        # default 1500 steps each, three runs in parallel
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1500}
BASE=checkpoints/dit-digits
COMMON=(--data digits --model DiT-Digits/4 --objective flow --max-steps "$STEPS" --batch-size 32 --lr 4e-4
        --lr-warmup-steps 100 --ema-decay 0.995 --checkpointing-steps 500 --sample-every 500 --seed 0
        --init-from "$BASE" --teacher "$BASE")
export OMP_NUM_THREADS=1
python train.py "${COMMON[@]}" --attention linear --init-attention none --output-dir runs/digits-linear &
python train.py "${COMMON[@]}" --attention proxy --attention-options '{"window": [2, 2]}' --init-attention all \
    --output-dir runs/digits-proxy &
python train.py "${COMMON[@]}" --router-lr 1e-2 --output-dir runs/digits-dynamic \
    --dynamic '{"target": 0.5, "hold_steps": 100, "warmup_steps": 500, "router_bias": 3.0, "token_router_bias": 3.0}' &
wait
for v in linear proxy dynamic; do
    python -m dit.eval runs/digits-$v/final --num-per-class 50 --out runs/digits-$v/eval.json --min-agreement 0.90 || true
done
