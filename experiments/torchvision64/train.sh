#!/usr/bin/env bash
# Issue 20: baselines for torchvision resnet18 and mobilenet_v3_small on a 64-px ImageFolder, trained here from
# scratch (no published weights offline). The ImageFolder is the CIFAR-10 JPEG copy (../shared/data), read at
# --input-size 64 (each 32-px image resized bilinearly to 64 px; pad-crop + flip augmentation). Test: the copy's
# 10,000 test/ images; selection: 5,000 images held out of train/ (seed 0). Run from the repository root.
set -euo pipefail
PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-$HOME/.cache/compressor/tv64}
ROOT=$CACHE/cifar10-jpeg
[ -d "$ROOT/train" ] || { mkdir -p "$CACHE"; tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C "$CACHE"; }
LOG=experiments/torchvision64
common=(--num-classes 10 --input-size 64 --data imagefolder --data-root "$ROOT" --schedule onecycle
        --label-smoothing 0.1 --batch-size 128 --seed 0 --no-progress --device cpu)
$PY -u -m compressor train --model torchvision:resnet18 "${common[@]}" --epochs 3 --lr 0.1 \
  --out checkpoints/tv64/resnet18_base --overwrite 2>&1 | tee $LOG/train_resnet18.log
$PY -u -m compressor train --model torchvision:mobilenet_v3_small "${common[@]}" --epochs 4 --lr 0.1 \
  --out checkpoints/tv64/mobilenet_v3_small_base --overwrite 2>&1 | tee $LOG/train_mobilenet_v3_small.log
