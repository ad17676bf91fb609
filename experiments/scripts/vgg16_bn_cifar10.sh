#!/usr/bin/env bash
# vgg16_bn on CIFAR-10: rank -> prune -> fine-tune -> eval, one GPU.
# HRankPlus recipe (150 epochs, multistep 50/100); RECIPE=experiments/recipes/chip_cifar.yaml for CHIP's (200 epochs, cosine, 5 warm-up). Rates: hrankplus_58/67/79.yaml = the published 58/67/79% MAC reductions.
# Settings: see _pipeline.sh (BASELINE, RECIPE, RATES, NPROC, KD=1, DATA_ROOT, EPOCHS, ...).
set -euo pipefail
export MODEL=vgg16_bn
export RATES=${RATES:-experiments/vgg16_bn_cifar10/hrankplus_58.yaml}
export RECIPE=${RECIPE:-experiments/recipes/hrankplus_cifar.yaml}
export NPROC=${NPROC:-1}
export BASELINE=${BASELINE-../shared/data/pretrained/vgg16_bn_cifar10_jpeg.pt}  # empty: train one first
exec "$(dirname "$0")/_pipeline.sh" "$@"
