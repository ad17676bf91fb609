#!/usr/bin/env bash
# Issue 20 part 3, the run that fitted the session: ResNet-56 at CHIP-48 from akamaster's weights as they are
# (top-1 83.20% on the CIFAR-10 JPEG copy, not adapted: the 2-epoch JPEG baseline of run_jpeg_baseline.sh did
# not finish in time on the shared machine), obs + reconstruction against l1 + reconstruction, no fine-tune,
# full 10k test split (baseline 83.20% measured in run_chip48.sh, not re-measured), seed 0, the same 128 calibration images for both (N=${N:-128}).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
N=${N:-128}
W=../shared/data/pretrained/resnet56-4bfd9763.th
D="--data cifar10 --data-root ../shared/data/cifar10-jpeg.tar.gz"
OUT=checkpoints/resnet56_chip48
c=$1  # l1 or obs
echo "== ${c}_recon_$N: start $(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$SECONDS
$PY -m compressor prune --model resnet56 --weights $W $D --rates experiments/resnet56_cifar10/chip_48.yaml \
    --criterion $c --reconstruct --reconstruct-images $N --baseline-eval skip --seed 0 --out $OUT/${c}_recon_$N --no-progress --overwrite
echo "== ${c}_recon_$N: done $(date -u +%T) in $((SECONDS - t0)) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
