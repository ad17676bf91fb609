#!/usr/bin/env bash
# Issue 21, MobileNet v2 row: baseline -> l1 + reconstruct (uniform 30%) -> float32/int8 ONNX, one bench run.
# Run from the repository root. The baseline was trained on a 1,000-per-class subset of the JPEG copy's training
# split (the box was too loaded for the full 50k; experiments/RESULTS.md, "Calibrated int8 export: MobileNet v2"); the test split is the
# copy's full 10,000 images.
set -euo pipefail
PY=.venv/bin/python
SRC=${SRC:-$HOME/.cache/compressor/cifar10-jpeg_e68964e694fd/cifar10-jpeg}  # the unpacked ../shared/data/cifar10-jpeg.tar.gz
DATA=checkpoints/mbv2_data/cifar10-jpeg-sub1000
export OMP_NUM_THREADS=1  # 2 threads on this shared 2-core box were 2.3x slower per image than 1 (barrier spinning)

if [ ! -d "$DATA" ]; then  # train/: the first 1,000 files (by name) of each class; test/: all 10,000
  mkdir -p "$DATA/train"
  cp -r "$SRC/test" "$DATA/test"
  for c in $(ls "$SRC/train"); do
    mkdir -p "$DATA/train/$c"
    ls "$SRC/train/$c" | sort | head -1000 | sed "s|^|$SRC/train/$c/|" | xargs cp -t "$DATA/train/$c"
  done
fi

$PY -u -m compressor train --model mobilenet_v2 --data cifar10 --data-root "$DATA" --epochs 1 --lr 0.05 \
  --batch-size 64 --schedule onecycle --val-size 500 --seed 0 --no-progress --device cpu --out checkpoints/mbv2_jpeg \
  2>&1 | tee experiments/int8/train_mbv2.log
# (in the recorded run the train command's closing 10k-image test evaluation was stopped (SIGKILL) to free the CPU
# for the prune, after best.pt was written; bench_int8 measures the baseline's test top-1 itself. best.pt was
# copied to checkpoints/mbv2_data/baseline_best.pt first.)
mkdir -p checkpoints/mbv2_data && cp checkpoints/mbv2_jpeg/best.pt checkpoints/mbv2_data/baseline_best.pt

$PY -u -m compressor prune --model mobilenet_v2 --checkpoint checkpoints/mbv2_jpeg/best.pt \
  --rates experiments/mobilenet_v2_cifar10/uniform_0.3.yaml --criterion l1 --reconstruct --seed 0 \
  --baseline-eval skip --eval-n 1000 --no-progress --device cpu --out checkpoints/mbv2_pruned \
  2>&1 | tee experiments/int8/prune_mbv2.log

$PY -u benchmarks/bench_int8.py --model mobilenet_v2 --baseline checkpoints/mbv2_data/baseline_best.pt \
  --pruned checkpoints/mbv2_pruned/pruned.pt --methods minmax --threads 1 --repeats 12 --warmup 2 \
  --out checkpoints/mbv2_bench \
  2>&1 | tee experiments/int8/bench_mbv2.log
cp checkpoints/mbv2_bench/bench_int8.json experiments/int8/bench_mbv2.json
cp checkpoints/mbv2_bench/bench_int8.md experiments/int8/bench_mbv2.md

# Latency only: the same rates with widths rounded to multiples of 8 (no reconstruction; accuracy not compared).
$PY -u -m compressor prune --model mobilenet_v2 --checkpoint checkpoints/mbv2_jpeg/best.pt \
  --rates experiments/mobilenet_v2_cifar10/uniform_0.3.yaml --criterion l1 --round-to 8 --seed 0 \
  --baseline-eval skip --eval-n 200 --no-progress --device cpu --out checkpoints/mbv2_pruned_r8
mkdir -p checkpoints/mbv2_r8_bench
$PY -m compressor export --checkpoint checkpoints/mbv2_pruned_r8/pruned.pt --out checkpoints/mbv2_r8_bench/pruned.fp32.onnx --n-real 8
$PY -m compressor export --checkpoint checkpoints/mbv2_pruned_r8/pruned.pt --int8 --n-test 500 --max-drop 100 \
  --out checkpoints/mbv2_r8_bench/pruned.int8.minmax.onnx
cp checkpoints/mbv2_bench/unpruned.fp32.onnx checkpoints/mbv2_r8_bench/
$PY -u experiments/int8/retime.py checkpoints/mbv2_r8_bench 1 20
$PY -u experiments/int8/retime.py checkpoints/mbv2_r8_bench 1 30
