#!/usr/bin/env bash
# One-shot GPU checks for issue 10 (torch.compile, training hot path, GPU-fast variants, FSDP, benchmark).
# Every step has its own timeout (together 565 s at most); everything lands in $OUT (8 files, flat).
#
# Prepare once, on the machine with internet (the GPU machine has none; it lacks diffusers):
#   mkdir -p build/device-wheels && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d build/device-wheels diffusers==0.42.1 importlib_metadata==8.7.0
# Then run it there (the `run` tool: command `bash scripts/gpu_checks.sh`, carry ["build/device-wheels"],
# timeout_s 600), or on any CUDA machine: OUT=/tmp/gpu_out bash scripts/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu_checks_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ACCELERATE_DISABLE_RICH=1 HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
START=$(date +%s)
step() {  # step NAME TIMEOUT LOG CMD...: run with a timeout, log, say how it ended
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s) ===" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s (elapsed $(( $(date +%s) - START ))s) ===" | tee -a "$log" "$OUT/summary.txt"
}

# 0. environment: carried wheels (diffusers), device and versions
if ls build/device-wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/device-wheels/*.whl >>"$OUT/env.txt" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
  $PY -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1; } >>"$OUT/env.txt" 2>&1

# 1. the @pytest.mark.gpu tests (bf16/fp16 sampling, compile vs eager, CUDA training + NaN guard, linear attention
#    bf16 at 16384 tokens, proxy bf16, xformers vs SDPA or its one-line error) and the CPU-path tests on CUDA
step "gpu tests" 140 "$OUT/gpu_tests.log" $PY -m pytest -q -m gpu tests/test_gpu.py -rs

# 2. the benchmark (the table, gpu.json, gpu.png), in two processes so that each half gets its share of the time:
#    forward + training, then the variants + the whole sampling jobs vs diffusers' DiTPipeline
#    (`python -m dit.bench gpu` alone runs all four sections in one process, ~5 min)
step "dit.bench gpu forward+train" 135 "$OUT/bench.log" $PY -m dit.bench gpu --sections forward train \
  --budget-s 105 --output /tmp/bench_a
step "dit.bench gpu variants+sampling" 140 "$OUT/bench.log" $PY -m dit.bench gpu --sections variants sampling \
  --budget-s 110 --output /tmp/bench_b
# where each variant's time goes (top kernels of one eager XL-width forward at 4096 tokens), for the next fix
step "dit.bench gpu profile" 35 "$OUT/bench.log" $PY -m dit.bench gpu --sections profile --no-plot --output /tmp/bench_p
cp /tmp/bench_p/gpu_profile.txt "$OUT/" 2>>"$OUT/bench.log"
tar -czf "$OUT/bench.tar.gz" -C /tmp bench_a bench_b 2>>"$OUT/bench.log"

# 3. FSDP (the shipped config on one GPU): train, resume under FSDP, refuse a DDP/single resume, --init-from works
FS=/tmp/fsdp1.yaml
sed -e 's/^num_processes: .*/num_processes: 1/' configs/accelerate/fsdp_xl.yaml >"$FS"
TINY="--data digits --model DiT-Micro/4 --image-size 16 --batch-size 8 --checkpointing-steps 2 --no-preview"
step "fsdp train 4 steps" 40 "$OUT/fsdp.log" $PY -m accelerate.commands.launch --config_file "$FS" train.py $TINY \
  --max-steps 4 --output-dir /tmp/fsdp_run
step "fsdp resume to 6" 35 "$OUT/fsdp.log" $PY -m accelerate.commands.launch --config_file "$FS" train.py $TINY \
  --max-steps 6 --output-dir /tmp/fsdp_run --resume-from latest
step "single-process resume of an FSDP checkpoint (expect rc=1, one clear error)" 20 "$OUT/fsdp.log" \
  $PY train.py $TINY --max-steps 8 --output-dir /tmp/fsdp_run --resume-from latest
step "init-from the FSDP checkpoint" 20 "$OUT/fsdp.log" $PY train.py $TINY --max-steps 2 \
  --output-dir /tmp/from_fsdp --init-from /tmp/fsdp_run/checkpoint-6
ls -R /tmp/fsdp_run/checkpoint-6 >>"$OUT/fsdp.log" 2>&1

# 4. optional (CLI_CHECKS=1; they do not fit the 10-minute run with the rest): train.py with --compile + bf16
#    (images/s and MFU in metrics.jsonl), sample.py's load / warm-up / sampling times, eager then compiled
if [ "${CLI_CHECKS:-0}" = 1 ]; then
step "train.py DiT-S/2 bf16 --compile" 75 "$OUT/cli.log" $PY train.py --data digits --model DiT-S/2 --image-size 32 \
  --channels 1 --batch-size 128 --mixed-precision bf16 --compile --max-steps 60 --log-every 20 \
  --checkpointing-steps 60 --no-preview --output-dir /tmp/train_s2
tail -n 4 /tmp/train_s2/metrics.jsonl >>"$OUT/cli.log" 2>&1
step "sample.py bundled model, eager then --compile" 45 "$OUT/cli.log" bash -c \
  "$PY sample.py --num-images 64 --batch-size 64 --output /tmp/s_eager && $PY sample.py --num-images 64 \
   --batch-size 64 --compile --output /tmp/s_comp"
fi
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
