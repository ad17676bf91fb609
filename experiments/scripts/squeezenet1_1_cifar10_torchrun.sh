#!/usr/bin/env bash
# squeezenet1_1 on CIFAR-10: rank -> prune -> fine-tune -> eval, torchrun on NPROC GPUs (default 4).
# Baseline training and fine-tuning run DDP; ranking/pruning one process.
# Settings: see _pipeline.sh (BASELINE, RECIPE, RATES, NPROC, KD=1, DATA_ROOT, EPOCHS, ...).
set -euo pipefail
NPROC=${NPROC:-4} exec "$(dirname "$0")/squeezenet1_1_cifar10.sh" "$@"
