#!/usr/bin/env bash
# vgg16_bn on CIFAR-10: rank -> prune -> fine-tune -> eval, torchrun on NPROC GPUs (default 4; global batch 256 kept).
# Same recipe as vgg16_bn_cifar10.sh; fine-tuning runs DDP, ranking/pruning one process.
# Settings: see _pipeline.sh (BASELINE, RECIPE, RATES, NPROC, KD=1, DATA_ROOT, EPOCHS, ...).
set -euo pipefail
NPROC=${NPROC:-4} exec "$(dirname "$0")/vgg16_bn_cifar10.sh" "$@"
