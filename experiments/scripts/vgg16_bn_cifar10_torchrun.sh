#!/usr/bin/env bash
# vgg16_bn on CIFAR-10: rank -> prune -> fine-tune -> eval, torchrun on NPROC GPUs (default 4; global batch 256 kept).
# Same recipe as vgg16_bn_cifar10.sh; fine-tuning runs DDP, ranking/pruning one process.
# Settings: see _pipeline.sh (BASELINE, RECIPE, RATES, NPROC, KD=1, DATA_ROOT, EPOCHS, ...).
set -euo pipefail
export MODEL=vgg16_bn
export RATES=${RATES:-experiments/vgg16_bn_cifar10/hrankplus_58.yaml}
export RECIPE=${RECIPE:-experiments/recipes/hrankplus_cifar.yaml}
export NPROC=${NPROC:-4}
export BASELINE=${BASELINE-../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt}  # empty: train one first
exec "$(dirname "$0")/_pipeline.sh" "$@"
