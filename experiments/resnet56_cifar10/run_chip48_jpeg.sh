#!/usr/bin/env bash
# Issue 20 part 3 (and part 2 on a residual net): ResNet-56 from the JPEG-adapted baseline (run_jpeg_baseline.sh
# step 1 -> checkpoints/resnet56_jpeg/baseline_ft/best.pt), CHIP-48 keep counts (chip_48.yaml) or the same MACs
# allocated by policy obs (obs_alloc_48.yaml); obs or l1 selection, reconstruction on N calibration images
# (default 128), no fine-tune; then one distilled epoch (teacher: the baseline) from the best of them.
# BLOCKS=400 adds obs + reconstruct + --block-refit 400 (refit_blocks; run_block_refit.py compares settings).
# R=74 runs CHIP's 74%-MACs list (chip_74.yaml) instead, into chip74_* folders.
# Full 10k test split, seed 0.  Usage: N=128 bash experiments/resnet56_cifar10/run_chip48_jpeg.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
N=${N:-128}
R=${R:-48}
T=$([ "$R" = 48 ] && echo "" || echo "chip${R}_")  # the CHIP-48 runs keep their first names
OUT=checkpoints/resnet56_jpeg
B=$OUT/baseline_ft/best.pt
D=experiments/resnet56_cifar10
run() {  # name, rates, extra args
  local name=$1 rates=$2; shift 2
  echo "== $name: start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
  local t0=$SECONDS
  $PY -m compressor prune --checkpoint $B --rates $rates --reconstruct --reconstruct-images $N --seed 0 \
      --out $OUT/$name --no-progress --overwrite "$@"
  echo "== $name: done $(date -u +%T) in $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
}
run ${T}l1_recon_$N $D/chip_$R.yaml --criterion l1
run ${T}obs_recon_$N $D/chip_$R.yaml --criterion obs
[ -f $D/obs_alloc_$R.yaml ] && run ${T}obs_alloc_recon_$N $D/obs_alloc_$R.yaml --criterion obs
if [ "${BLOCKS:-0}" != 0 ]; then  # then the block refit: BLOCKS Adam steps per residual block
  run ${T}obs_recon_blocks${BLOCKS}_$N $D/chip_$R.yaml --criterion obs --block-refit "$BLOCKS"
fi
if [ "${FT:-1}" = 1 ]; then
  for name in ${T}l1_recon_$N ${T}obs_recon_$N; do
    echo "== $name + 1 distilled epoch: start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
    $PY -m compressor finetune --checkpoint $OUT/$name/pruned.pt --teacher $B --epochs 1 --lr 0.01 --warmup-epochs 0 \
        --eval-every 0.25 --seed 0 --out $OUT/${name}_ft1 --no-progress --overwrite
    echo "== $name + 1 distilled epoch: done $(date -u +%T)"
  done
fi
