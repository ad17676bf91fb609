#!/usr/bin/env bash
# squeezenet1_1 on CIFAR-10: rank -> prune -> fine-tune -> eval, one GPU.
# No pretrained CIFAR baseline ships: one is trained first (experiments/recipes/cifar_baseline.yaml) unless BASELINE is set.
# Settings: see _pipeline.sh (BASELINE, RECIPE, RATES, NPROC, KD=1, DATA_ROOT, EPOCHS, ...).
set -euo pipefail
export MODEL=squeezenet1_1
export RATES=${RATES:-experiments/squeezenet1_1_cifar10/uniform_0.3.yaml}
export RECIPE=${RECIPE:-experiments/recipes/hrankplus_cifar.yaml}
export NPROC=${NPROC:-1}
export BASELINE=${BASELINE:-}
exec "$(dirname "$0")/_pipeline.sh" "$@"
