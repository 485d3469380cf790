#!/usr/bin/env bash
# The one prepared run for a lent GPU (`make bench-gpu`; README, "Benchmarks"), about 10 minutes
# on an H100/H200. Each step writes its JSON under $OUT (default benchmarks/results) as it
# finishes and is bounded by its own timeout, so that a slow step cannot take the rest with it:
#   1. LRN, ours vs nn.LocalResponseNorm, on CUDA                                    (≤ 60 s)
#   2. training img/s of the `paper` preset (227 px, width 1.0, bf16, channels-last,
#      torch.compile) against the seed recipe, and the share of a step spent in data  (≤ 180 s)
#   3. the `paper` preset trained for GPU_EPOCHS (30) epochs on Fashion-MNIST: accuracy
#      curve, 10-crop test accuracy, training seconds                                (≤ 330 s)
#
# The device machine of this workplace has PyTorch in its python3 but no venv and no dataset:
# carry the dataset (30 MB) in a git-ignored folder, e.g. from the repository root:
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/ && echo /.data/ >> .git/info/exclude
#   (device run, carry [".data"])  OUT=$OUT DATA=.data/fashion-mnist bash benchmarks/gpu_check.sh
# A dry run of every step on the CPU, tiny, checks the script itself (about 3 minutes):
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
EPOCHS=${GPU_EPOCHS:-30}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v "batch/s" | tail -40; }

# QUICK=1: the same commands on a tiny network and a 2,000-image subset (dry run, not a measurement)
if [ "${QUICK:-0}" = 1 ]; then
  SMALL=(--set image_size=67 --set width=0.0625 --set compile=false)
  STEPS=(--steps 2 --seed-steps 1 --rounds 1 --warmup 1)
  EPOCHS=1; MAX_TRAIN=(--max-train 2000); LRN=(--quick --repeats 1 --warmup 0)
  TAG=dry
else
  SMALL=()
  STEPS=(--steps 300 --seed-steps 40 --rounds 3 --warmup 20)
  MAX_TRAIN=(); LRN=()
  TAG=$DEVICE
fi

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
[ -d "$DATA" ] || echo "no dataset at $DATA: step 3 will fail (see the comment at the top)"

# 1. LRN: ours vs nn.LocalResponseNorm
step 60 $PY benchmarks/bench_lrn.py --device "$DEVICE" "${LRN[@]}" --out "$OUT/lrn-$TAG.json"
# 2. throughput of the paper preset against the seed recipe at 227 px, data share included
step 180 $PY benchmarks/bench_train.py --device "$DEVICE" --preset paper --compile "${STEPS[@]}" \
  "${SMALL[@]}" --out "$OUT/train-$TAG-paper.json"
# 3. the paper preset trained as far as the time allows (30 epochs: to convergence on an H200)
step 330 $PY benchmarks/bench_train.py --device "$DEVICE" --preset paper --compile --skip-seed \
  --steps 20 --rounds 1 --warmup 5 "${SMALL[@]}" --epochs "$EPOCHS" "${MAX_TRAIN[@]}" --data "$DATA" \
  --out "$OUT/accuracy-$TAG-paper.json"
ls -la "$OUT"
