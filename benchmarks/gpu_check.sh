#!/usr/bin/env bash
# The one prepared run for a lent GPU (see README, "Benchmarks"): each step writes its
# JSON under $OUT (default benchmarks/results) as it finishes, and is bounded by its own
# timeout so that a slow step cannot take the rest with it.
#   DATA=dir-with-fashion-mnist-gz  bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v "batch/s" | tail -40; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# 1. LRN: ours vs nn.LocalResponseNorm on CUDA
step 60 $PY benchmarks/bench_lrn.py --device cuda --out "$OUT/lrn-cuda.json"
# 2. training throughput at the paper's 227 px: alexops (bf16, channels_last) vs the seed recipe
step 100 $PY benchmarks/bench_train.py --device cuda --image-size 227 --width 1.0 --steps 40 \
  --seed-steps 15 --out "$OUT/train-cuda-227.json"
# 3. a short accuracy run of the paper-sized net at 227 px
step 150 $PY benchmarks/bench_train.py --device cuda --image-size 227 --width 1.0 --steps 5 \
  --skip-seed --epochs ${GPU_EPOCHS:-6} --set lr=0.02 --data "$DATA" --out "$OUT/accuracy-cuda-227.json"
# 4. CPU-sized candidates, each at the epochs ~10 min of 2-core CPU training allows
#    (fp32, no channels_last: the CPU's numerics), to choose the CPU default quickly
for cfg in "99 0.25 20 0.05" "99 0.5 8 0.05" "67 0.5 12 0.05" "83 0.375 12 0.05"; do
  set -- $cfg
  step 60 $PY benchmarks/bench_train.py --device cuda --image-size $1 --width $2 --epochs $3 \
    --set lr=$4 --set amp=false --set channels_last=false --steps 5 --skip-seed --data "$DATA" \
    --out "$OUT/cpu-candidate-$1px-w$2-e$3.json"
done
ls -la "$OUT"
