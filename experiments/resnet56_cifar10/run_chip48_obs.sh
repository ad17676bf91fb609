#!/usr/bin/env bash
# Issue 20 part 3: ResNet-56 at CHIP-48 from the JPEG-adapted baseline (run_jpeg_baseline.sh step 1),
# obs selection + reconstruction against l1 + reconstruction; no fine-tune, then one distilled epoch.
# Full 10k test split, 512 calibration images (--reconstruct-images default), seed 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=checkpoints/resnet56_jpeg
B=$OUT/baseline_ft/best.pt
R=experiments/resnet56_cifar10/chip_48.yaml
run() {  # name, extra args
  local name=$1; shift
  echo "== $name: start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  local t0=$SECONDS
  $PY -m compressor prune --checkpoint $B --rates $R --reconstruct --seed 0 --out $OUT/$name --no-progress \
      --overwrite "$@"
  echo "== $name: done $(date -u +%T) in $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
}
run obs_recon --criterion obs
run l1_recon --criterion l1
run obs_recon_ft1 --criterion obs --finetune-epochs 1 --lr 0.01 --warmup-epochs 0 --teacher self --eval-every 0.25
run l1_recon_ft1 --criterion l1 --finetune-epochs 1 --lr 0.01 --warmup-epochs 0 --teacher self --eval-every 0.25
