#!/usr/bin/env bash
# Issue 20: ResNet-56 at CHIP-48 MACs (0.51933 kept), obs + reconstruct (128 images), no fine-tune: CHIP's rates vs
# policy obs and policy local (uniform), each with the residual spaces cut (--residual) and kept (--no-residual).
# Run from the repository root after run_jpeg_baseline.sh step 1 (checkpoints/resnet56_jpeg/baseline_ft/best.pt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python; OUT=checkpoints/resnet56_jpeg; B=$OUT/baseline_ft/best.pt; D=experiments/resnet56_cifar10
run() { local name=$1; shift; echo "== $name: start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"; local t0=$SECONDS
  $PY -m compressor prune --checkpoint $B --reconstruct --reconstruct-images 128 --seed 0 --out $OUT/$name --no-progress --overwrite "$@"
  echo "== $name: done $(date -u +%T) in $((SECONDS - t0)) s"; }
run chip48_again_obs --rates $D/chip_48.yaml --criterion obs
run alloc48_obs_residual --rates $D/obs_alloc_48.yaml --criterion obs
run alloc48_obs_noresidual --rates $D/obs_alloc_48.yaml --criterion obs --no-residual
run local48_obs_noresidual --macs 0.51933 --criterion obs --no-residual
run local48_obs_residual --macs 0.51933 --criterion obs --residual
