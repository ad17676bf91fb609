#!/usr/bin/env bash
# Issue 20, after run_prune.sh: random selection at the same counts, and obs + reconstruct + a 200-step block refit
# (refit_blocks, lr 1e-3, on the 512 reconstruction images), for both models; no fine-tune.
set -euo pipefail
. experiments/torchvision64/common.sh
for model in mobilenet_v3_small resnet18; do
  for run in random obs-blocks200; do
    crit=${run%%-*}
    extra=()
    [ "$run" = obs-blocks200 ] && extra=(--block-refit 200)
    stamp "$model $run start"
    $PY -u -m compressor prune --checkpoint $OUT/${model}_base/best.pt --macs 0.5 --criterion $crit --reconstruct \
      --seed 0 --no-progress --device cpu --out $OUT/${model}_${run} --overwrite "${extra[@]}" \
      2>&1 | tee $LOG/prune_${model}_${run}.log
    cp $OUT/${model}_${run}/summary.json $LOG/summary_${model}_${run}.json
    stamp "$model $run done"
  done
done
$PY $LOG/table.py > $LOG/table.md
