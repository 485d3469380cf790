#!/usr/bin/env bash
# The one prepared run for a lent GPU (`make bench-gpu`; README, "Benchmarks"): about 5 minutes on
# an H200, its steps' limits 10 minutes together. Each step writes its JSON under $OUT (default benchmarks/results) as it
# finishes and is bounded by its own timeout, so that a slow step cannot take the rest with it:
#   0. the CUDA test of the streamed batches (tests/test_datasets.py)                   (≤ 60 s)
#   1. LRN, ours vs nn.LocalResponseNorm, on CUDA                                    (≤ 45 s)
#   2. training img/s of the `paper` preset (227 px, width 1.0, bf16, channels-last,
#      torch.compile) against the seed recipe, and the share of a step spent in data  (≤ 150 s)
#   3. the training loop streaming a 3.7 GiB memory-mapped cache against the same loop with
#      the images on the GPU and the model alone: the data share of streaming       (≤ 100 s)
#   4. the `paper` preset trained on Fashion-MNIST for GPU_EPOCHS (50) epochs, fewer where
#      step 2's img/s says they would not fit: accuracy curve, 10-crop test accuracy  (≤ 260 s)
#
# The device machine of this workplace has PyTorch in its python3 but no venv, no simplejpeg and
# no dataset: carry them in git-ignored folders, e.g. from the repository root:
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl simplejpeg==1.9.0
#   echo /.data/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   (device run, carry [".data", ".whl"])  OUT=$OUT DATA=.data/fashion-mnist bash benchmarks/gpu_check.sh
# A dry run of every step on the CPU, tiny, checks the script itself (about 3 minutes):
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
DEVICE=${DEVICE:-cuda}
EPOCHS=${GPU_EPOCHS:-50}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | grep -v "batch/s" | tail -40; }

if ! $PY -c "import simplejpeg" 2>/dev/null; then
  if ls .whl/simplejpeg-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/simplejpeg-*.whl \
      && export PYTHONPATH=/tmp/site
  else
    echo "no simplejpeg for $PY: steps 2-4 will fail to import alexops (see the comment at the top)"
  fi
fi

# QUICK=1: the same commands on a tiny network and a 2,000-image subset (dry run, not a measurement)
if [ "${QUICK:-0}" = 1 ]; then
  SMALL=(--set image_size=67 --set width=0.0625 --set compile=false)
  STEPS=(--steps 2 --seed-steps 1 --rounds 1 --warmup 1)
  STREAM=(--images 512 --rounds 1 --image-size 67 --width 0.0625)
  EPOCHS=1; MAX_TRAIN=(--max-train 2000); LRN=(--quick --repeats 1 --warmup 0)
  TAG=dry
else
  SMALL=()
  STEPS=(--steps 300 --seed-steps 40 --rounds 3 --warmup 20)
  STREAM=(--images 20000 --rounds 3 --compile)
  MAX_TRAIN=(); LRN=()
  TAG=$DEVICE
fi

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
[ -d "$DATA" ] || echo "no dataset at $DATA: step 4 will fail (see the comment at the top)"

# 0. the streamed batches arrive whole on the GPU (side streams, events, the allocator)
step 60 env PYTHONPATH="src:${PYTHONPATH:-}" $PY -m pytest -q -p no:cacheprovider tests/test_datasets.py \
  -k "streamed_to_the_gpu"
# 1. LRN: ours vs nn.LocalResponseNorm
step 45 $PY benchmarks/bench_lrn.py --device "$DEVICE" "${LRN[@]}" --out "$OUT/lrn-$TAG.json"
# 2. throughput of the paper preset against the seed recipe at 227 px, data share included
rm -f "$OUT/train-$TAG-paper.json"  # step 4 sizes its run from this file: never from an older one
step 150 $PY benchmarks/bench_train.py --device "$DEVICE" --preset paper --compile "${STEPS[@]}" \
  "${SMALL[@]}" --out "$OUT/train-$TAG-paper.json"
# 3. the data share of the training loop streaming from a memory-mapped cache
step 100 $PY benchmarks/bench_prepare.py --work /tmp/alexops-stream --out "$OUT/prepare-stream-$TAG.json" \
  stream-loop --device "$DEVICE" "${STREAM[@]}"
# 4. the paper preset trained as far as 200 s of training at step 2's speed allows (GPU_EPOCHS at most)
FIT=$($PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(max(1, min($EPOCHS, int(200 * 0.8 * r['alexops']['img_per_s'] / 55000))))" \
  "$OUT/train-$TAG-paper.json" 2>/dev/null || echo $((EPOCHS < 10 ? EPOCHS : 10)))
echo "training for $FIT epochs"
step 260 $PY benchmarks/bench_train.py --device "$DEVICE" --preset paper --compile --skip-seed \
  --steps 20 --rounds 1 --warmup 5 "${SMALL[@]}" --epochs "$FIT" "${MAX_TRAIN[@]}" --data "$DATA" \
  --out "$OUT/accuracy-$TAG-paper.json"
ls -la "$OUT"
